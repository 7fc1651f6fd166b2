// The agent's import rules, checked by `./build.sh lint` (docs/architecture.md explains the layers they keep).
// Only imports that exist at run time count: `import type` is erased by tsc and ties no module to another.
// A folder is a first path segment under agent/src; errors.ts, log.ts and config.ts there are leaves.

/** Everything above the host helpers (system/, images/, vm/), by folder. */
const ABOVE_HOST = '^agent/src/(core|mechanisms|sandbox|packages|synthesis|api|telemetry|discovery|trust|cli|update)/|^agent/src/(main|compose)\\.ts$';
/** What builds on core/: the runtimes and stores it declares interfaces for, the mechanisms, the faces, the programs. */
const ABOVE_CORE = '^agent/src/(mechanisms|sandbox|packages|synthesis|api|telemetry|discovery|trust|cli|update)/|^agent/src/(main|compose)\\.ts$';
/** The peer mechanisms: none imports another (what two of them share lives in vm/ or core/). */
const MECHANISM = '^agent/src/mechanisms/(cached-vm|on-demand|app-virt|synthesis)\\.ts$';
/** The programs' entry points (package.json "bin"): run, never imported. */
const ENTRY_POINTS = '^agent/src/(main|cli/main|cli/cloudlet-package|update/cli|update/bundle-tool|synthesis/cli)\\.ts$';

/** One module per external system: only `owner` may import `library`. */
const onlyOwner = (name, library, owner, comment) => ({
  name,
  comment,
  severity: 'error',
  from: { pathNot: owner },
  to: { path: `(^|/)node_modules/${library}/` },
});

module.exports = {
  forbidden: [
    {
      name: 'no-folder-cycles',
      comment: 'Folders form layers: if a imports b, b never imports a, not even through a third folder.',
      severity: 'error',
      scope: 'folder',
      from: { path: '^agent/src/' },
      to: { circular: true },
    },
    {
      name: 'no-file-cycles',
      comment: 'Modules load in one order; a cycle between files is a folder cycle in the making, or one module in two files.',
      severity: 'error',
      from: { path: '^(agent|native)/' },
      to: { circular: true },
    },
    {
      name: 'leaves-stay-leaves',
      comment: 'errors.ts, log.ts and config.ts are imported by every folder, so they import none.',
      severity: 'error',
      from: { path: '^agent/src/(errors|log|config)\\.ts$' },
      to: { path: '^agent/src/[^/]+/' },
    },
    {
      name: 'entry-points-are-not-imported',
      comment: 'main.ts and the CLIs run; what another module needs of them belongs in a module of its own.',
      severity: 'error',
      from: {},
      to: { path: ENTRY_POINTS },
    },
    {
      name: 'only-main-composes',
      comment: 'compose.ts, the composition root, is called by main.ts alone; nothing below it knows how the parts are wired.',
      severity: 'error',
      from: { pathNot: '^agent/src/main\\.ts$' },
      to: { path: '^agent/src/compose\\.ts$' },
    },
    {
      name: 'host-helpers-stay-low',
      comment: 'system/, images/ and vm/ wrap the host (files, qemu-img, zstd, libvirt): they know nothing of the cloudlet built on them.',
      severity: 'error',
      from: { path: '^agent/src/(system|images|vm)/' },
      to: { path: ABOVE_HOST },
    },
    {
      name: 'images-below-vm',
      comment: 'vm/ builds on images/ (qemu-img, qcow2 reading) for its domains and save images; images/ knows nothing of VMs.',
      severity: 'error',
      from: { path: '^agent/src/images/' },
      to: { path: '^agent/src/vm/' },
    },
    {
      name: 'core-knows-no-adapters',
      comment: 'core/ declares the interfaces (runtimes, stores, VM Synthesis) that compose.ts fills in; it imports none of their implementations.',
      severity: 'error',
      from: { path: '^agent/src/core/' },
      to: { path: ABOVE_CORE },
    },
    {
      name: 'runtimes-below-mechanisms',
      comment: 'sandbox/, packages/ and synthesis/ are used by mechanisms and the composition root, never the other way round.',
      severity: 'error',
      from: { path: '^agent/src/(sandbox|packages|synthesis)/' },
      to: { path: '^agent/src/(mechanisms|api|telemetry|discovery|cli|update)/|^agent/src/(main|compose)\\.ts$' },
    },
    {
      name: 'mechanisms-are-peers',
      comment: 'A mechanism never imports another: what two share (restore-or-boot, domain specs) lives in vm/ or core/.',
      severity: 'error',
      from: { path: MECHANISM },
      to: { path: MECHANISM },
    },
    {
      name: 'faces-on-top',
      comment: 'Only main.ts starts the HTTP faces; telemetry shares their JSON wire shapes (api/wire-shapes.ts) and nothing else.',
      severity: 'error',
      from: { pathNot: '^agent/src/(api/|main\\.ts$|telemetry/)' },
      to: { path: '^agent/src/api/' },
    },
    {
      name: 'telemetry-shares-only-wire-shapes',
      comment: 'Telemetry publishes what /v1 answers, in the same shapes, without importing a face.',
      severity: 'error',
      from: { path: '^agent/src/telemetry/' },
      to: { path: '^agent/src/api/', pathNot: '^agent/src/api/wire-shapes\\.ts$' },
    },
    {
      name: 'announcers-are-started-by-main',
      comment: 'Telemetry and discovery listen to the core; only main.ts starts them.',
      severity: 'error',
      from: { pathNot: '^agent/src/(main\\.ts$|telemetry/|discovery/)' },
      to: { path: '^agent/src/(telemetry|discovery)/' },
    },
    {
      name: 'programs-stay-apart',
      comment: 'The cloudlet CLI (cli/) and cloudlet-update (update/) are programs of their own; the agent imports neither.',
      severity: 'error',
      from: { pathNot: '^agent/src/cli/' },
      to: { path: '^agent/src/cli/' },
    },
    {
      name: 'updater-stays-apart',
      comment: 'cloudlet-update (update/) must run when the agent does not: the agent imports none of it.',
      severity: 'error',
      from: { pathNot: '^agent/src/update/' },
      to: { path: '^agent/src/update/' },
    },
    {
      name: 'only-vm-calls-native',
      comment: 'The C shim over libvirt (native/) is called by vm/ alone (vm/hypervisor.ts).',
      severity: 'error',
      from: { path: '^agent/src/', pathNot: '^agent/src/vm/' },
      to: { path: '^native/' },
    },
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
    {
      name: 'no-dev-dependencies-in-the-agent',
      comment: 'The appliance installs dependencies only: agent code never needs a devDependency at run time.',
      severity: 'error',
      from: { path: '^(agent|native)/' },
      to: { dependencyTypes: ['npm-dev'] },
    },
    {
      name: 'no-undeclared-packages',
      comment: "Every package the agent imports is in package.json, not merely installed as something else's dependency.",
      severity: 'error',
      from: { path: '^(agent|native)/' },
      to: { dependencyTypes: ['npm-no-pkg', 'npm-unknown'] },
    },
    {
      name: 'not-to-unresolvable',
      comment: 'An import that resolves to nothing.',
      severity: 'error',
      from: {},
      to: { couldNotResolve: true },
    },
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
