// ./build.sh bench synthesis-link — VM Synthesis over a Wi-Fi-like link: first byte sent → Service VM answering,
// ours against Elijah's way, in one run on bench/synthesis.ts's images.
//
// The phone is a network namespace of the benchmark's own, joined to the root namespace by a veth whose two ends are
// shaped with `tc tbf` (both directions) to 100 and 25 Mbit/s. netem is not available here, so the link adds no
// delay beyond its queue. The agent runs in the root namespace with its forwarded ports on the veth's root-side
// address, so the phone reaches a Service VM the way it would on a cloudlet's Wi-Fi. The agent's API listens on
// loopback only in tests; a byte relay on the veth address passes the phone's HTTPS connection to its TLS port
// (and notes when each of the phone's chunks arrives: the last one is the overlay's last byte).
//   ours:   the phone (bench/support/phone.ts) uploads our overlay with a paired device's token over HTTPS, and the
//           agent applies it as it arrives and restores while the memory state is rebuilt; its answer names the
//           endpoint; the phone GETs the page there.
//   Elijah: the phone uploads the xdelta3 -9 + xz -9 overlay (plain HTTP, to a receiver in this process: no TLS
//           cost, in its favour); then it is decoded (xz -d, xdelta3 -d), then the customized VM's complete saved
//           state is restored (a Cached VM start, the agent's fastest restore path); that answer names the
//           endpoint; the phone GETs the page there.
// Both times run on the phone's clock from before its first byte to the page. after_last_byte is the page's time
// minus the last upload byte's arrival. Ends with one line of JSON.
import { spawn } from 'node:child_process';
import { createWriteStream } from 'node:fs';
import { mkdir, mkdtemp, rm } from 'node:fs/promises';
import http from 'node:http';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { pipeline } from 'node:stream/promises';
import { Connection } from '../native/libvirt';
import { AgentProcess, ROOT } from '../test/support/agent';
import { pairDevice } from '../test/support/pairing';
import { median, round, runsOf, sized } from './support/measure';
import type { PhoneJob, PhoneStamps } from './support/phone';
import {
  APP_PAGE,
  buildSynthesisImages,
  CACHED_APP,
  createElijahOverlay,
  createOverlay,
  decodeElijahOverlay,
  post,
  registerCachedApp,
  sh,
  size,
  timed,
} from './support/synthesis-images';

const RUNS = runsOf(3);
/** Link rates in Mbit/s; quick: the faster one only. */
const RATES = sized([100, 25], [100]);
const PHONE = path.join(ROOT, 'dist', 'bench', 'support', 'phone.js');

/** The phone's namespace and the veth between it and the root namespace; a subnet of the benchmark's own. */
const net24 = `10.91.${(process.pid % 250) + 1}`;
const LINK = {
  namespace: `clphone${process.pid}`,
  rootEnd: `clp${process.pid}r`,
  phoneEnd: `clp${process.pid}p`,
  rootAddress: `${net24}.1`,
  phoneAddress: `${net24}.2`,
};

async function makeLink(): Promise<void> {
  await sh('ip', ['netns', 'add', LINK.namespace]);
  await sh('ip', ['link', 'add', LINK.rootEnd, 'type', 'veth', 'peer', 'name', LINK.phoneEnd, 'netns', LINK.namespace]);
  await sh('ip', ['addr', 'add', `${LINK.rootAddress}/24`, 'dev', LINK.rootEnd]);
  await sh('ip', ['link', 'set', LINK.rootEnd, 'up']);
  await sh('ip', ['-n', LINK.namespace, 'addr', 'add', `${LINK.phoneAddress}/24`, 'dev', LINK.phoneEnd]);
  for (const dev of ['lo', LINK.phoneEnd]) await sh('ip', ['-n', LINK.namespace, 'link', 'set', dev, 'up']);
}

/** Both directions at `mbit` (platform.md Q10); the burst is at least one millisecond of the rate. */
async function shapeLink(mbit: number): Promise<void> {
  const tbf = ['root', 'tbf', 'rate', `${mbit}mbit`, 'burst', `${Math.max(4096, (mbit * 1e6) / 8 / 1000)}`, 'latency', '400ms'];
  await sh('tc', ['qdisc', 'replace', 'dev', LINK.rootEnd, ...tbf]);
  await sh('ip', ['netns', 'exec', LINK.namespace, 'tc', 'qdisc', 'replace', 'dev', LINK.phoneEnd, ...tbf]);
}

/** Deleting the namespace deletes the veth pair, both ends. */
const removeLink = () => sh('ip', ['netns', 'del', LINK.namespace]).catch(() => '');

/** Runs the phone in its namespace; resolves with its stamps. */
function phone(job: PhoneJob): Promise<PhoneStamps> {
  return new Promise((resolve, reject) => {
    const child = spawn('ip', ['netns', 'exec', LINK.namespace, process.execPath, PHONE], { stdio: ['pipe', 'pipe', 'inherit'] });
    let out = '';
    child.stdout.on('data', (c: Buffer) => (out += c.toString()));
    child.on('error', reject);
    child.on('close', (code) =>
      code === 0 ? resolve(JSON.parse(out.trim().split('\n').pop()!) as PhoneStamps) : reject(new Error(`the phone exited with ${code}`)),
    );
    child.stdin.end(JSON.stringify(job));
  });
}

/** A byte relay from the veth address to a loopback port, noting when each chunk from the phone arrives. */
async function relay(toPort: number): Promise<{ server: net.Server; port: number; arrivals: bigint[] }> {
  const arrivals: bigint[] = [];
  const server = net.createServer((phoneSide) => {
    const agentSide = net.connect(toPort, '127.0.0.1');
    phoneSide.on('data', () => arrivals.push(process.hrtime.bigint()));
    phoneSide.pipe(agentSide).pipe(phoneSide);
    const close = () => {
      phoneSide.destroy();
      agentSide.destroy();
    };
    phoneSide.on('error', close).on('close', close);
    agentSide.on('error', close).on('close', close);
  });
  await new Promise<void>((resolve) => server.listen(0, LINK.rootAddress, resolve));
  return { server, port: (server.address() as net.AddressInfo).port, arrivals };
}

interface ElijahOutcome {
  lastByte: bigint;
  decodeMs: number;
  restoreMs: number;
  instanceId: string;
}

/**
 * Elijah's side: receives the overlay's files (POST /0, /1, …) into `dir`; once the last has arrived, decodes them,
 * restores the customized VM and answers with its endpoint. `next()` gives what it measured.
 */
async function elijahReceiver(agent: AgentProcess, decode: (files: string[]) => Promise<number>, files: number, dir: string) {
  let settle: (o: ElijahOutcome) => void = () => {};
  let fail: (err: Error) => void = () => {};
  const received = Array.from({ length: files }, (_, i) => path.join(dir, `${i}.xd.xz`));
  const server = http.createServer((req, res) => {
    const index = Number(req.url?.slice(1));
    let lastByte = 0n;
    req.on('data', () => (lastByte = process.hrtime.bigint()));
    void (async () => {
      await pipeline(req, createWriteStream(received[index]!));
      if (index < files - 1) return res.writeHead(201).end('{}');
      const decodeMs = await decode(received);
      const restore = await timed(() => post(agent, '/v1/instances', { service_id: CACHED_APP }, 201));
      settle({ lastByte, decodeMs, restoreMs: restore.ms, instanceId: restore.value.instance.id });
      res.writeHead(201, { 'content-type': 'application/json' }).end(JSON.stringify(restore.value));
    })().catch((err: Error) => {
      fail(err);
      res.writeHead(500).end(JSON.stringify({ message: err.message }));
    });
  });
  await new Promise<void>((resolve) => server.listen(0, LINK.rootAddress, resolve));
  return {
    server,
    port: (server.address() as net.AddressInfo).port,
    /** What the next upload will come to (one upload at a time): call it before the upload starts. */
    next: () => new Promise<ElijahOutcome>((res, rej) => ([settle, fail] = [res, rej])),
  };
}

const ms = (from: bigint | string, to: bigint | string) => Number(BigInt(to) - BigInt(from)) / 1e6;

async function main() {
  const scratch = await mkdtemp(path.join(os.tmpdir(), 'cloudlet-bench-synthesis-link-'));
  await removeLink(); // what a killed earlier run with the same process id left
  const agent = await makeLink()
    .then(() => AgentProcess.start({ portRange: '24460-24479', env: { CLOUDLET_FORWARD_ADDRESS: LINK.rootAddress } }))
    .catch(async (err: Error) => {
      await removeLink();
      throw err;
    });
  const conn = await Connection.open('qemu:///system');
  /** The relay and the receiver, closed at the end (the receiver's kept-alive connections with it). */
  const servers: Array<net.Server | http.Server> = [];
  try {
    const images = await buildSynthesisImages(agent, conn, scratch);
    const ours = await createOverlay(images);
    const elijah = await createElijahOverlay(images);
    const oursBytes = await size(ours.file);
    await registerCachedApp(agent, images);

    const device = await pairDevice(agent, 'bench phone');
    const system = (await agent.get('/v1/system')).json;
    const tls = await relay(system.tls_port as number);
    const received = path.join(scratch, 'received');
    await mkdir(received);
    const receiver = await elijahReceiver(agent, (files) => decodeElijahOverlay(images, files), elijah.files.length, received);
    servers.push(tls.server, receiver.server);

    const result: Record<string, number | number[] | string> = {
      bench: 'synthesis-link',
      runs: RUNS,
      overlay_bytes: oursBytes,
      elijah_bytes: elijah.bytes,
      size_vs_elijah: round(oursBytes / elijah.bytes, 3),
    };
    const loadBefore = os.loadavg()[0]!;
    for (const mbit of RATES) {
      await shapeLink(mbit);
      const runs = {
        e2e: [] as number[],
        after: [] as number[],
        elijah: [] as number[],
        elijahAfter: [] as number[],
        decode: [] as number[],
        restore: [] as number[],
        oursRestore: [] as number[],
        mbits: [] as number[],
      };
      for (let i = 0; i < RUNS; i++) {
        // --- ours ---
        tls.arrivals.length = 0;
        const o = await phone({
          mode: 'ours',
          host: LINK.rootAddress,
          port: tls.port,
          files: [ours.file],
          token: device.token,
          fingerprint: system.tls_fingerprint,
          page: APP_PAGE,
        });
        const lastByte = tls.arrivals.filter((t) => t < BigInt(o.response_ns)).pop()!;
        runs.e2e.push(ms(o.first_ns, o.answer_ns));
        runs.after.push(ms(lastByte, o.answer_ns));
        runs.oursRestore.push(o.timings.libvirt_ms + o.timings.guest_ms);
        await agent.delete(`/v1/instances/${o.instance_id}`);
        // --- Elijah ---
        const outcome = receiver.next();
        const e = await phone({ mode: 'elijah', host: LINK.rootAddress, port: receiver.port, files: elijah.files, page: APP_PAGE });
        const done = await outcome;
        runs.elijah.push(ms(e.first_ns, e.answer_ns));
        runs.elijahAfter.push(ms(done.lastByte, e.answer_ns));
        runs.decode.push(done.decodeMs);
        runs.restore.push(done.restoreMs);
        runs.mbits.push((elijah.bytes * 8) / (ms(e.first_ns, done.lastByte) * 1000));
        await agent.delete(`/v1/instances/${done.instanceId}`);
        process.stderr.write(
          `${mbit} Mbit/s run ${i + 1}: ours ${round(runs.e2e[i]!)} ms (${round(runs.after[i]!)} ms after the last byte; ` +
            `restore → ready ${round(runs.oursRestore[i]!)} ms), ` +
            `Elijah ${round(runs.elijah[i]!)} ms (upload at ${round(runs.mbits[i]!)} Mbit/s, decode ${round(done.decodeMs)} ms, restore ${round(done.restoreMs)} ms)\n`,
        );
      }
      const e2e = median(runs.e2e);
      const elijahE2e = median(runs.elijah);
      Object.assign(result, {
        [`e2e_ms_${mbit}mbit`]: round(e2e),
        [`elijah_e2e_ms_${mbit}mbit`]: round(elijahE2e),
        [`e2e_vs_elijah_${mbit}mbit`]: round(e2e / elijahE2e, 3),
        [`after_last_byte_ms_${mbit}mbit`]: round(median(runs.after)),
        [`restore_ready_ms_${mbit}mbit`]: round(median(runs.oursRestore)),
        [`elijah_after_last_byte_ms_${mbit}mbit`]: round(median(runs.elijahAfter)),
        [`elijah_decode_ms_${mbit}mbit`]: round(median(runs.decode)),
        [`elijah_restore_ms_${mbit}mbit`]: round(median(runs.restore)),
        [`link_mbit_s_${mbit}mbit`]: round(median(runs.mbits)),
        [`e2e_runs_ms_${mbit}mbit`]: runs.e2e.map((x) => round(x)),
        [`elijah_e2e_runs_ms_${mbit}mbit`]: runs.elijah.map((x) => round(x)),
      });
    }
    result.load_avg = [round(loadBefore, 2), round(os.loadavg()[0]!, 2)];
    process.stdout.write(`${JSON.stringify(result)}\n`);
  } finally {
    for (const s of servers) {
      s.close();
      if (s instanceof http.Server) s.closeAllConnections();
    }
    await conn.close();
    await agent.dispose();
    await removeLink();
    await rm(scratch, { recursive: true, force: true });
  }
}

main().catch((err) => {
  process.stderr.write(`bench synthesis-link failed: ${(err as Error).stack}\n`);
  process.exit(1);
});
