import type { EndReason, MovedTo } from './events';
import type { InstanceRecord } from './types';

/** How an instance ended, as far as its runtime can tell; or that the registry handed it to another cloudlet (`moved`). */
export interface InstanceEnding {
  state: 'stopped' | 'crashed' | 'moved';
  reason: EndReason;
  movedTo?: MovedTo;
}

/** An instance saved as it was serving: its memory state and its disk, files that stand alone. */
export interface SavedInstance {
  state: string;
  disk: string;
}

/**
 * Where a mechanism's instances run (libvirt domains for the VM mechanisms, sandboxes for app-virt) and how the
 * registry finds, labels and ends them. Each runtime stores an instance's record with the instance itself, so the
 * registry can be rebuilt.
 */
export interface InstanceRuntime {
  /** Ids of this runtime's instances that are running now (cheap: the registry polls it). */
  running(): Promise<Set<string>>;
  /** Every running instance that carries a record: what an agent adopts after a restart. */
  listInstances(): Promise<InstanceRecord[]>;
  writeRecord(record: InstanceRecord): Promise<void>;
  /** End it; an instance that is already gone counts as ended. */
  destroy(id: string): Promise<void>;
  /**
   * Save the running instance into the directory `into` (the instance stops): what a memory-state capture keeps
   * (runtimes whose instances can be restored: VMs).
   */
  save?(record: InstanceRecord, into: string): Promise<SavedInstance>;
  /**
   * Call listener as soon as one of the runtime's instances ends, however it ended (runtimes that can tell).
   * Resolves once watching; rejects when the runtime cannot deliver such events (then the registry only polls).
   */
  watchEnded?(listener: (id: string, ending: InstanceEnding) => void): Promise<void>;
  /** Call listener each time the runtime is reachable again after it was lost (runtimes that can lose it). */
  onReconnected?(listener: () => void): void;
  /** The last `maxBytes` of the console output of the instance whose directory is `dir` (runtimes that have one). */
  consoleTail?(dir: string, maxBytes: number): Promise<string>;
}
