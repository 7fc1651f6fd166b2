// The agent's import rules, checked by `./build.sh lint` (docs/architecture.md explains the layers they keep).
// Only imports that exist at run time count: `import type` is erased by tsc and ties no module to another.
// A folder is a first path segment under agent/src; errors.ts, log.ts and config.ts there are leaves.

/** Everything above the host helpers (system/, images/, vm/), by folder. */
const ABOVE_HOST = '^agent/src/(core|mechanisms|sandbox|packages|synthesis|api|telemetry|discovery|fleet|trust|cli|update)/|^agent/src/(main|compose)\\.ts$';
/** What builds on core/: the runtimes and stores it declares interfaces for, the mechanisms, the faces, the programs. */
const ABOVE_CORE = '^agent/src/(mechanisms|sandbox|packages|synthesis|api|telemetry|discovery|fleet|trust|cli|update)/|^agent/src/(main|compose)\\.ts$';
/** The peer mechanisms: none imports another (what two of them share lives in vm/ or core/). */
const MECHANISM = '^agent/src/mechanisms/(cached-vm|on-demand|app-virt|synthesis)\\.ts$';
/** The programs' entry points (package.json "bin"): run, never imported. */
const ENTRY_POINTS = '^agent/src/(main|cli/main|cli/cloudlet-package|update/cli|update/bundle-tool|synthesis/cli)\\.ts$';

/** A forbidden import: from a module matching `from` to one matching `to`, with why it is forbidden. */
const forbid = (name, comment, from, to, scope = 'module') => ({ name, comment, severity: 'error', scope, from, to });

/** One module per external system: only `owner` may import `library`. */
const onlyOwner = (name, library, owner, comment) => forbid(name, comment, { pathNot: owner }, { path: `(^|/)node_modules/${library}/` });

module.exports = {
  forbidden: [
    forbid(
      'no-folder-cycles',
      'Folders form layers: if a imports b, b never imports a, not even through a third folder.',
      { path: '^agent/src/' },
      { circular: true },
      'folder',
    ),
    forbid(
      'no-file-cycles',
      'Modules load in one order; a cycle between files is a folder cycle in the making, or one module in two files.',
      { path: '^(agent|native)/' },
      { circular: true },
    ),
    forbid(
      'leaves-stay-leaves',
      'errors.ts, log.ts and config.ts are imported by every folder, so they import none.',
      { path: '^agent/src/(errors|log|config)\\.ts$' },
      { path: '^agent/src/[^/]+/' },
    ),
    forbid(
      'entry-points-are-not-imported',
      'main.ts and the CLIs run; what another module needs of them belongs in a module of its own.',
      {},
      { path: ENTRY_POINTS },
    ),
    forbid(
      'only-main-composes',
      'compose.ts, the composition root, is called by main.ts alone; nothing below it knows how the parts are wired.',
      { pathNot: '^agent/src/main\\.ts$' },
      { path: '^agent/src/compose\\.ts$' },
    ),
    forbid(
      'host-helpers-stay-low',
      'system/, images/ and vm/ wrap the host (files, qemu-img, zstd, libvirt): they know nothing of the cloudlet built on them.',
      { path: '^agent/src/(system|images|vm)/' },
      { path: ABOVE_HOST },
    ),
    forbid(
      'images-below-vm',
      'vm/ builds on images/ (qemu-img, qcow2 reading) for its domains and save images; images/ knows nothing of VMs.',
      { path: '^agent/src/images/' },
      { path: '^agent/src/vm/' },
    ),
    forbid(
      'core-knows-no-adapters',
      'core/ declares the interfaces (runtimes, stores, VM Synthesis) that compose.ts fills in; it imports none of their implementations.',
      { path: '^agent/src/core/' },
      { path: ABOVE_CORE },
    ),
    forbid(
      'runtimes-below-mechanisms',
      'sandbox/, packages/ and synthesis/ are used by mechanisms and the composition root, never the other way round.',
      { path: '^agent/src/(sandbox|packages|synthesis)/' },
      { path: '^agent/src/(mechanisms|api|telemetry|discovery|cli|update)/|^agent/src/(main|compose)\\.ts$' },
    ),
    forbid(
      'mechanisms-are-peers',
      'A mechanism never imports another: what two share (restore-or-boot, domain specs) lives in vm/ or core/.',
      { path: MECHANISM },
      { path: MECHANISM },
    ),
    forbid(
      'faces-on-top',
      'Only main.ts starts the HTTP faces; telemetry shares their JSON wire shapes (api/wire-shapes.ts) and nothing else.',
      { pathNot: '^agent/src/(api/|main\\.ts$|telemetry/)' },
      { path: '^agent/src/api/' },
    ),
    forbid(
      'telemetry-shares-only-wire-shapes',
      'Telemetry publishes what /v1 answers, in the same shapes, without importing a face.',
      { path: '^agent/src/telemetry/' },
      { path: '^agent/src/api/', pathNot: '^agent/src/api/wire-shapes\\.ts$' },
    ),
    forbid(
      'announcers-are-started-by-main',
      'Telemetry and discovery listen to the core; only main.ts starts them.',
      { pathNot: '^agent/src/(main\\.ts$|telemetry/|discovery/)' },
      { path: '^agent/src/(telemetry|discovery)/' },
    ),
    forbid(
      'programs-stay-apart',
      'The cloudlet CLI (cli/) and cloudlet-update (update/) are programs of their own; the agent imports neither.',
      { pathNot: '^agent/src/cli/' },
      { path: '^agent/src/cli/' },
    ),
    forbid(
      'updater-stays-apart',
      'cloudlet-update (update/) must run when the agent does not: the agent imports none of it.',
      { pathNot: '^agent/src/update/' },
      { path: '^agent/src/update/' },
    ),
    forbid(
      'only-vm-calls-native',
      'The C shim over libvirt (native/) is called by vm/ alone (vm/hypervisor.ts).',
      { path: '^agent/src/', pathNot: '^agent/src/vm/' },
      { path: '^native/' },
    ),
    onlyOwner(
      'only-native-and-sd-notify-use-ffi',
      'ffi-rs',
      '^native/|^agent/src/system/systemd\\.ts$',
      'FFI: libvirt through native/, and libsystemd sd_notify in system/systemd.ts.',
    ),
    onlyOwner('only-transport-knows-uws', 'uWebSockets\\.js', '^agent/src/api/uws-', 'uWebSockets.js is behind the HTTP transport (api/uws-*.ts).'),
    onlyOwner('only-discovery-speaks-dbus', 'dbus-next', '^agent/src/discovery/', 'D-Bus (Avahi) is discovery/ alone.'),
    onlyOwner('only-telemetry-speaks-mqtt', '(aedes|mqtt)', '^agent/src/telemetry/', 'The MQTT broker and client are telemetry/ alone.'),
    onlyOwner(
      'only-cli-discovery-speaks-mdns',
      'multicast-dns',
      '^agent/src/cli/discovery\\.ts$',
      'The CLI finds cloudlets over mDNS in cli/discovery.ts alone.',
    ),
    onlyOwner('only-xml-dom-parses-xml', '@xmldom/xmldom', '^agent/src/vm/xml-dom\\.ts$', 'Every XML from outside is read by vm/xml-dom.ts.'),
    forbid(
      'no-dev-dependencies-in-the-agent',
      'The appliance installs dependencies only: agent code never needs a devDependency at run time.',
      { path: '^(agent|native)/' },
      { dependencyTypes: ['npm-dev'] },
    ),
    forbid(
      'no-undeclared-packages',
      "Every package the agent imports is in package.json, not merely installed as something else's dependency.",
      { path: '^(agent|native)/' },
      { dependencyTypes: ['npm-no-pkg', 'npm-unknown'] },
    ),
    forbid('not-to-unresolvable', 'An import that resolves to nothing.', {}, { couldNotResolve: true }),
  ],
  options: {
    doNotFollow: { path: 'node_modules' },
    tsPreCompilationDeps: false,
    tsConfig: { fileName: 'tsconfig.json' },
    // As Node resolves them (aedes publishes only package.json "exports").
    enhancedResolveOptions: { exportsFields: ['exports'], conditionNames: ['require', 'node', 'default'] },
    // package.json is read for its version (core/), not a module to check.
    exclude: { path: 'package\\.json$' },
  },
};
