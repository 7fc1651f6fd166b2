/**
 * The seccomp filter every sandboxed app runs under (bwrap --seccomp): a classic-BPF program, emitted here so it
 * needs no library. A deny-list of the kernel surface an unprivileged app has no use for and that sandbox escapes
 * go through: namespaces (nested user namespaces gave uid 0 and mounts inside), mounts, tracing, keyrings, BPF,
 * perf, userfaultfd, io_uring, module and kexec loading, and the host-wide knobs (clock, swap, reboot). Everything
 * else is allowed, so ordinary apps run unchanged. x86_64 only: any other ABI (i386 via int 0x80, x32) is refused.
 */
import { CloudletError } from '../errors';

const AUDIT_ARCH_X86_64 = 0xc000003e;
const X32_SYSCALL_BIT = 0x40000000;
const RET_ALLOW = 0x7fff0000;
const RET_ERRNO = 0x00050000;
const RET_KILL_PROCESS = 0x80000000;
const EPERM = 1;
const ENOSYS = 38;

// classic BPF opcodes
const LD_W_ABS = 0x20;
const JEQ_K = 0x15;
const JGE_K = 0x35;
const JSET_K = 0x45;
const RET_K = 0x06;

// struct seccomp_data offsets
const NR = 0;
const ARCH = 4;
const ARG0_LOW = 16;

/** x86_64 numbers of the denied system calls (they fail with EPERM). */
export const DENIED_SYSCALLS: Record<string, number> = {
  ptrace: 101,
  syslog: 103,
  vhangup: 153,
  pivot_root: 155,
  adjtimex: 159,
  acct: 163,
  settimeofday: 164,
  mount: 165,
  umount2: 166,
  swapon: 167,
  swapoff: 168,
  reboot: 169,
  iopl: 172,
  ioperm: 173,
  init_module: 175,
  delete_module: 176,
  quotactl: 179,
  lookup_dcookie: 212,
  clock_settime: 227,
  kexec_load: 246,
  add_key: 248,
  request_key: 249,
  keyctl: 250,
  unshare: 272,
  perf_event_open: 298,
  name_to_handle_at: 303,
  open_by_handle_at: 304,
  clock_adjtime: 305,
  setns: 308,
  process_vm_readv: 310,
  process_vm_writev: 311,
  kcmp: 312,
  finit_module: 313,
  kexec_file_load: 320,
  bpf: 321,
  userfaultfd: 323,
  io_uring_setup: 425,
  io_uring_enter: 426,
  io_uring_register: 427,
  open_tree: 428,
  move_mount: 429,
  fsopen: 430,
  fsconfig: 431,
  fsmount: 432,
  fspick: 433,
  pidfd_getfd: 438,
  mount_setattr: 442,
};
const CLONE = 56;
/** clone3 passes its flags in memory a filter cannot read: ENOSYS makes libc fall back to clone. */
const CLONE3 = 435;
/** CLONE_NEWNS | NEWCGROUP | NEWUTS | NEWIPC | NEWUSER | NEWPID | NEWNET | NEWTIME: clone may not create namespaces. */
const CLONE_NAMESPACE_FLAGS = 0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000 | 0x20000000 | 0x40000000 | 0x00000080;

type Instruction = [code: number, jt: number, jf: number, k: number];

/** The filter as bwrap reads it: struct sock_filter[] in host byte order. */
export function sandboxSeccompFilter(arch: string = process.arch): Buffer {
  if (arch !== 'x64') throw new CloudletError('SANDBOX_UNAVAILABLE', `the sandbox seccomp filter is defined for x86_64 only, not ${arch}`);
  const program: Instruction[] = [
    [LD_W_ABS, 0, 0, ARCH],
    [JEQ_K, 1, 0, AUDIT_ARCH_X86_64],
    [RET_K, 0, 0, RET_KILL_PROCESS],
    [LD_W_ABS, 0, 0, NR],
    [JGE_K, 0, 1, X32_SYSCALL_BIT],
    [RET_K, 0, 0, RET_ERRNO | EPERM],
    ...Object.values(DENIED_SYSCALLS).flatMap((nr): Instruction[] => [
      [JEQ_K, 0, 1, nr],
      [RET_K, 0, 0, RET_ERRNO | EPERM],
    ]),
    [JEQ_K, 0, 1, CLONE3],
    [RET_K, 0, 0, RET_ERRNO | ENOSYS],
    [JEQ_K, 1, 0, CLONE],
    [RET_K, 0, 0, RET_ALLOW],
    [LD_W_ABS, 0, 0, ARG0_LOW],
    [JSET_K, 0, 1, CLONE_NAMESPACE_FLAGS],
    [RET_K, 0, 0, RET_ERRNO | EPERM],
    [RET_K, 0, 0, RET_ALLOW],
  ];
  const out = Buffer.alloc(program.length * 8);
  program.forEach(([code, jt, jf, k], i) => {
    out.writeUInt16LE(code, i * 8);
    out.writeUInt8(jt, i * 8 + 2);
    out.writeUInt8(jf, i * 8 + 3);
    out.writeUInt32LE(k >>> 0, i * 8 + 4);
  });
  return out;
}
