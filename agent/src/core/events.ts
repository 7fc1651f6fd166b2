/**
 * The core's event bus: what happens to instances, as it happens. The registry emits; the WebSocket stream, MQTT
 * telemetry and discovery listen. Listeners run synchronously in emit order and must not throw or block: each one
 * that does slow work (sockets) queues it itself.
 */
import type { Instance } from './types';

/**
 * Every state an instance passes through; `stopped`, `crashed` and `moved` are final (the instance is gone from this
 * cloudlet; `moved`: it runs on, at another one, docs/handoff.md).
 */
export type InstanceLifecycleState = Instance['state'] | 'stopped' | 'crashed' | 'moved';

/** Whether nothing more will happen to the instance here: it stopped, crashed or moved to another cloudlet. */
export const isFinalState = (state: InstanceLifecycleState): boolean => state === 'stopped' || state === 'crashed' || state === 'moved';

/** Where a moved instance runs now: the cloudlet it was handed to, and its new endpoint there. */
export interface MovedTo {
  /** The peer's id here (a paired cloudlet, GET /v1/peers). */
  cloudletId: string;
  name: string;
  address: string;
  /** Its new forward there. */
  port: number;
  /** That cloudlet's API port (where a KD client polls). */
  apiPort: number;
}

/**
 * Why an instance reached a final state: `requested` (its last user stopped it), `launch-failed`,
 * `not-ready` (adopted while starting, never became ready), `out-of-memory` (a sandbox's memory limit), `authorization-ended`
 * (its last user was a device whose authorization was revoked or expired), or what libvirt reported for a VM that ended outside
 * the agent: `shutdown`, `destroyed`, `crashed`, `failed` (QEMU died, e.g. killed), `saved`, `migrated`,
 * or `vanished` when it was only noticed missing; `handed-off` (moved to another cloudlet, which runs it on).
 */
export type EndReason =
  | 'requested'
  | 'launch-failed'
  | 'not-ready'
  | 'out-of-memory'
  | 'shutdown'
  | 'destroyed'
  | 'crashed'
  | 'failed'
  | 'saved'
  | 'migrated'
  | 'vanished'
  | 'authorization-ended'
  | 'handed-off';

export interface InstanceStateEvent {
  type: 'instance';
  state: InstanceLifecycleState;
  /** The instance as it is now (its last view for a final state). */
  instance: Instance;
  reason?: EndReason;
  /** A moved instance: where it runs now. */
  movedTo?: MovedTo;
  at: string;
}

/** Launch phases in order; restoring (from a memory state) and booting are alternatives; synthesizing (applying a VM
 *  overlay as it arrives) comes first for a synthesis. */
export type LaunchPhase = 'synthesizing' | 'cloning' | 'restoring' | 'booting' | 'provisioning' | 'waiting-ready' | 'ready';

export interface LaunchProgressEvent {
  type: 'progress';
  instanceId: string;
  serviceId: string;
  phase: LaunchPhase;
  /** 0–100: a rough share of the launch, refined by bytes where they are known. */
  percent: number;
  /** Bytes of the memory state streamed into the VM so far, and in all (restores); of the overlay applied (synthesis). */
  bytes?: { done: number; total: number };
  at: string;
}

export type CloudletEvent = InstanceStateEvent | LaunchProgressEvent;

export type EventListener = (event: CloudletEvent) => void;

export class EventBus {
  private readonly listeners = new Set<EventListener>();

  /** Returns the unsubscribe function. */
  subscribe(listener: EventListener): () => void {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }

  emit(event: CloudletEvent): void {
    for (const listener of this.listeners) listener(event);
  }
}
