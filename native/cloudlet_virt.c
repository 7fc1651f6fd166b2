/*
 * cloudlet_virt: the thin C layer between native/libvirt.ts (through ffi-rs) and libvirt.
 *
 * Every exported clv_* operation returns a heap clv_result that the caller reads with the clv_result_*
 * accessors and then releases with clv_result_free. A failing libvirt call's error is copied into that
 * result right away, on the thread that made the call, because libvirt keeps it in thread-local storage
 * and ffi-rs runs these functions on libuv pool threads.
 *
 * JS never holds a virDomainPtr: domain operations take a UUID string and look up, operate on and
 * free the domain within one call.
 *
 * libvirt is dlopen()ed by clv_init instead of linked, so that a missing library or an old one
 * lacking a symbol is reported as an error instead of failing to load the shim.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <libvirt/libvirt.h>
#include <libvirt/libvirt-qemu.h>
#include <libvirt/virterror.h>

/* Every libvirt function the shim calls. Adding one here makes clv_init resolve it and report it when missing. */
#define LIBVIRT_FUNCTIONS(X) \
    X(virGetVersion) \
    X(virInitialize) \
    X(virEventRegisterDefaultImpl) \
    X(virEventRunDefaultImpl) \
    X(virConnectDomainEventRegisterAny) \
    X(virConnectDomainEventDeregisterAny) \
    X(virSetErrorFunc) \
    X(virGetLastError) \
    X(virConnectOpen) \
    X(virConnectClose) \
    X(virConnectIsAlive) \
    X(virConnectGetVersion) \
    X(virConnectGetCapabilities) \
    X(virConnectGetDomainCapabilities) \
    X(virConnectListAllDomains) \
    X(virDomainDefineXML) \
    X(virDomainCreateXML) \
    X(virDomainCreate) \
    X(virDomainDestroy) \
    X(virDomainUndefineFlags) \
    X(virDomainLookupByName) \
    X(virDomainLookupByUUIDString) \
    X(virDomainGetUUIDString) \
    X(virDomainGetName) \
    X(virDomainGetState) \
    X(virDomainIsActive) \
    X(virDomainIsPersistent) \
    X(virDomainGetXMLDesc) \
    X(virDomainGetMetadata) \
    X(virDomainSetMetadata) \
    X(virDomainSaveFlags) \
    X(virDomainRestoreFlags) \
    X(virDomainResume) \
    X(virDomainMigrateToURI3) \
    X(virDomainGetJobStats) \
    X(virDomainAbortJob) \
    X(virTypedParamsAddString) \
    X(virTypedParamsGetULLong) \
    X(virTypedParamsFree) \
    X(virDomainFree)

#define DECLARE_POINTER(name) __typeof__(name) *name;
static struct {
    LIBVIRT_FUNCTIONS(DECLARE_POINTER)
} virt;

typedef struct clv_result {
    int32_t failed;
    int32_t err_code;       /* virErrorNumber */
    int32_t err_domain;     /* virErrorDomain; CLV_ERR_DOMAIN_SHIM for the shim's own errors */
    const char *operation;  /* libvirt function that failed (static string) */
    char *err_message;
    int64_t value;          /* numeric result: connection pointer, version, state, boolean */
    int64_t detail;         /* second numeric result (state reason) */
    char *text;             /* string result (owned) */
} clv_result;

#define CLV_ERR_DOMAIN_SHIM (-1)

/* Calls libvirt function fn, noting its name so that a failure is reported against it. */
#define VIRT(r, fn, ...) ((r)->operation = #fn, virt.fn(__VA_ARGS__))

static clv_result *result_new(void)
{
    clv_result *r = calloc(1, sizeof *r);
    if (!r)
        abort(); /* like libvirt itself (glib), treat OOM as fatal */
    r->operation = "";
    return r;
}

static char *copy_string(const char *s)
{
    char *copy = strdup(s ? s : "");
    if (!copy)
        abort();
    return copy;
}

void clv_result_free(clv_result *r)
{
    if (!r)
        return;
    free(r->text);
    free(r->err_message);
    free(r);
}

/*
 * Accessors, one field each: ffi-rs leaks memory for every pointer it wraps as a JS External (returned
 * pointers, createPointer, wrapPointer), so JS holds a clv_result as a plain integer and reads it through
 * these instead of restorePointer. Numbers are widened to int64 so JS reads them all alike; strings are
 * never NULL (ffi-rs cannot read a NULL char*) and JS copies them before clv_result_free.
 */
int64_t clv_result_failed(const clv_result *r) { return r->failed; }
int64_t clv_result_error_code(const clv_result *r) { return r->err_code; }
int64_t clv_result_error_domain(const clv_result *r) { return r->err_domain; }
const char *clv_result_operation(const clv_result *r) { return r->operation; }
const char *clv_result_error_message(const clv_result *r) { return r->err_message ? r->err_message : ""; }
int64_t clv_result_value(const clv_result *r) { return r->value; }
int64_t clv_result_detail(const clv_result *r) { return r->detail; }
const char *clv_result_text(const clv_result *r) { return r->text ? r->text : ""; }

/* Copies this thread's last libvirt error into r; must run before any other libvirt call on the thread. */
static void capture_error(clv_result *r)
{
    virErrorPtr err = virt.virGetLastError();
    r->failed = 1;
    r->err_code = err ? err->code : VIR_ERR_INTERNAL_ERROR;
    r->err_domain = err ? err->domain : VIR_FROM_NONE;
    r->err_message = copy_string(err && err->message ? err->message : "unknown libvirt error");
}

/* Records a libvirt int return value (<0 = failure) as the result's value. */
static int check_int(clv_result *r, int64_t rc)
{
    if (rc < 0) {
        capture_error(r);
        return -1;
    }
    r->value = rc;
    return 0;
}

/* Takes ownership of a malloc'd libvirt string result (NULL = failure). */
static void take_text(clv_result *r, char *text)
{
    if (!text) {
        capture_error(r);
        return;
    }
    r->text = text;
}

/* Empty strings from JS stand for NULL (ffi-rs cannot pass a NULL char*). */
static const char *optional(const char *s)
{
    return s && *s ? s : NULL;
}

/* ---- domain lookup / release: the pattern every domain operation follows ---- */

static virDomainPtr lookup_domain(clv_result *r, virConnectPtr conn, const char *uuid)
{
    virDomainPtr dom = VIRT(r, virDomainLookupByUUIDString, conn, uuid);
    if (!dom)
        capture_error(r);
    return dom;
}

/* Frees dom (if any) and returns r. The operation's error, if any, was already captured. */
static clv_result *release_domain(clv_result *r, virDomainPtr dom)
{
    if (dom)
        virt.virDomainFree(dom);
    return r;
}

/* Sets the result text to dom's UUID and frees dom; dom NULL means the call that produced it failed. */
static clv_result *return_domain_uuid(clv_result *r, virDomainPtr dom)
{
    char uuid[VIR_UUID_STRING_BUFLEN];
    if (!dom)
        capture_error(r);
    else if (VIRT(r, virDomainGetUUIDString, dom, uuid) < 0)
        capture_error(r);
    else
        r->text = copy_string(uuid);
    return release_domain(r, dom);
}

/* ---- initialisation ---- */

static void ignore_libvirt_error(void *opaque, virErrorPtr err)
{
    (void)opaque;
    (void)err;
}

static void *libvirt_handle;

static void *run_event_loop(void *unused)
{
    (void)unused;
    for (;;)
        if (virt.virEventRunDefaultImpl() < 0)
            return NULL;
}

/*
 * libvirt delivers domain events only through a registered event loop, which must exist before the first
 * virConnectOpen (later connections would not get keepalives or events). The loop runs on its own detached thread
 * for the life of the process, so it never occupies a libuv pool thread and no JS callback runs on a foreign thread.
 */
static void start_event_loop(clv_result *r)
{
    static int started;
    pthread_t thread;
    if (started)
        return;
    if (VIRT(r, virEventRegisterDefaultImpl) < 0) {
        capture_error(r);
        return;
    }
    if (pthread_create(&thread, NULL, run_event_loop, NULL) != 0) {
        r->failed = 1;
        r->err_domain = CLV_ERR_DOMAIN_SHIM;
        r->err_message = copy_string("cannot start the libvirt event loop thread");
        return;
    }
    pthread_detach(thread);
    started = 1;
}

/*
 * dlopen()s libvirt (libvirt_path, e.g. "libvirt.so.0") and resolves every function in LIBVIRT_FUNCTIONS.
 * value = libvirt version (major*1e6 + minor*1e3 + micro, 0 if unknown); text = space-separated missing
 * symbols (empty when none). Only when nothing is missing is libvirt's default error printer (stderr)
 * replaced by a no-op and libvirt initialised. Fails (domain CLV_ERR_DOMAIN_SHIM) when dlopen fails.
 */
clv_result *clv_init(const char *libvirt_path)
{
    clv_result *r = result_new();
    r->operation = "dlopen";
    if (!libvirt_handle)
        libvirt_handle = dlopen(libvirt_path, RTLD_NOW | RTLD_LOCAL);
    if (!libvirt_handle) {
        r->failed = 1;
        r->err_domain = CLV_ERR_DOMAIN_SHIM;
        r->err_message = copy_string(dlerror());
        return r;
    }

    char *missing = NULL;
    size_t missing_len = 0;
    FILE *missing_out = open_memstream(&missing, &missing_len);
    if (!missing_out)
        abort();
#define RESOLVE(name) \
    if (!(virt.name = dlsym(libvirt_handle, #name))) \
        fprintf(missing_out, "%s%s", ftell(missing_out) ? " " : "", #name);
    LIBVIRT_FUNCTIONS(RESOLVE)
#undef RESOLVE
    fclose(missing_out);

    unsigned long version = 0;
    if (virt.virGetVersion && virt.virGetVersion(&version, NULL, NULL) == 0)
        r->value = (int64_t)version;
    if (missing_len > 0) {
        r->text = missing;
        return r;
    }
    free(missing);
    virt.virSetErrorFunc(NULL, ignore_libvirt_error); /* plain global assignment, safe before virInitialize */
    if (VIRT(r, virInitialize) < 0)
        capture_error(r);
    else
        start_event_loop(r);
    return r;
}

/* ---- connection ---- */

/* value = the virConnectPtr, which JS passes back as a 64-bit integer. */
clv_result *clv_open(const char *uri)
{
    clv_result *r = result_new();
    virConnectPtr conn = VIRT(r, virConnectOpen, uri);
    if (!conn)
        capture_error(r);
    r->value = (int64_t)(uintptr_t)conn;
    return r;
}

clv_result *clv_close(virConnectPtr conn)
{
    clv_result *r = result_new();
    check_int(r, VIRT(r, virConnectClose, conn));
    return r;
}

clv_result *clv_is_alive(virConnectPtr conn)
{
    clv_result *r = result_new();
    check_int(r, VIRT(r, virConnectIsAlive, conn));
    return r;
}

clv_result *clv_hypervisor_version(virConnectPtr conn)
{
    clv_result *r = result_new();
    unsigned long version = 0;
    if (check_int(r, VIRT(r, virConnectGetVersion, conn, &version)) == 0)
        r->value = (int64_t)version;
    return r;
}

clv_result *clv_capabilities(virConnectPtr conn)
{
    clv_result *r = result_new();
    take_text(r, VIRT(r, virConnectGetCapabilities, conn));
    return r;
}

clv_result *clv_domain_capabilities(virConnectPtr conn, const char *virttype, const char *arch)
{
    clv_result *r = result_new();
    take_text(r, VIRT(r, virConnectGetDomainCapabilities, conn, NULL, optional(arch), NULL, virttype, 0));
    return r;
}

/* ---- domains ---- */

clv_result *clv_define_domain(virConnectPtr conn, const char *xml)
{
    clv_result *r = result_new();
    return return_domain_uuid(r, VIRT(r, virDomainDefineXML, conn, xml));
}

clv_result *clv_create_domain(virConnectPtr conn, const char *xml, uint32_t flags)
{
    clv_result *r = result_new();
    return return_domain_uuid(r, VIRT(r, virDomainCreateXML, conn, xml, flags));
}

clv_result *clv_lookup_by_name(virConnectPtr conn, const char *name)
{
    clv_result *r = result_new();
    return return_domain_uuid(r, VIRT(r, virDomainLookupByName, conn, name));
}

clv_result *clv_start_domain(virConnectPtr conn, const char *uuid)
{
    clv_result *r = result_new();
    virDomainPtr dom = lookup_domain(r, conn, uuid);
    if (dom)
        check_int(r, VIRT(r, virDomainCreate, dom));
    return release_domain(r, dom);
}

clv_result *clv_destroy_domain(virConnectPtr conn, const char *uuid)
{
    clv_result *r = result_new();
    virDomainPtr dom = lookup_domain(r, conn, uuid);
    if (dom)
        check_int(r, VIRT(r, virDomainDestroy, dom));
    return release_domain(r, dom);
}

clv_result *clv_undefine_domain(virConnectPtr conn, const char *uuid, uint32_t flags)
{
    clv_result *r = result_new();
    virDomainPtr dom = lookup_domain(r, conn, uuid);
    if (dom)
        check_int(r, VIRT(r, virDomainUndefineFlags, dom, flags));
    return release_domain(r, dom);
}

/* Only the lookup: fails with VIR_ERR_NO_DOMAIN when there is no such domain. */
clv_result *clv_lookup_by_uuid(virConnectPtr conn, const char *uuid)
{
    clv_result *r = result_new();
    return release_domain(r, lookup_domain(r, conn, uuid));
}

/* value = virDomainState, detail = its reason. */
clv_result *clv_domain_state(virConnectPtr conn, const char *uuid)
{
    clv_result *r = result_new();
    virDomainPtr dom = lookup_domain(r, conn, uuid);
    int state = 0, reason = 0;
    if (dom && check_int(r, VIRT(r, virDomainGetState, dom, &state, &reason, 0)) == 0) {
        r->value = state;
        r->detail = reason;
    }
    return release_domain(r, dom);
}

clv_result *clv_domain_xml(virConnectPtr conn, const char *uuid, uint32_t flags)
{
    clv_result *r = result_new();
    virDomainPtr dom = lookup_domain(r, conn, uuid);
    if (dom)
        take_text(r, VIRT(r, virDomainGetXMLDesc, dom, flags));
    return release_domain(r, dom);
}

clv_result *clv_get_metadata(virConnectPtr conn, const char *uuid, const char *uri, uint32_t flags)
{
    clv_result *r = result_new();
    virDomainPtr dom = lookup_domain(r, conn, uuid);
    if (dom)
        take_text(r, VIRT(r, virDomainGetMetadata, dom, VIR_DOMAIN_METADATA_ELEMENT, uri, flags));
    return release_domain(r, dom);
}

/* An empty xml removes the element; key is then ignored. */
clv_result *clv_set_metadata(virConnectPtr conn, const char *uuid, const char *xml, const char *key,
                             const char *uri, uint32_t flags)
{
    clv_result *r = result_new();
    virDomainPtr dom = lookup_domain(r, conn, uuid);
    if (dom)
        check_int(r, VIRT(r, virDomainSetMetadata, dom, VIR_DOMAIN_METADATA_ELEMENT, optional(xml),
                          optional(key), uri, flags));
    return release_domain(r, dom);
}

clv_result *clv_save_domain(virConnectPtr conn, const char *uuid, const char *path, const char *dxml,
                            uint32_t flags)
{
    clv_result *r = result_new();
    virDomainPtr dom = lookup_domain(r, conn, uuid);
    if (dom)
        check_int(r, VIRT(r, virDomainSaveFlags, dom, path, optional(dxml), flags));
    return release_domain(r, dom);
}

clv_result *clv_restore_domain(virConnectPtr conn, const char *path, const char *dxml, uint32_t flags)
{
    clv_result *r = result_new();
    check_int(r, VIRT(r, virDomainRestoreFlags, conn, path, optional(dxml), flags));
    return r;
}

clv_result *clv_resume_domain(virConnectPtr conn, const char *uuid)
{
    clv_result *r = result_new();
    virDomainPtr dom = lookup_domain(r, conn, uuid);
    if (dom)
        check_int(r, VIRT(r, virDomainResume, dom));
    return release_domain(r, dom);
}

/* ---- live migration (a handoff to another cloudlet, docs/handoff.md) ---- */

/*
 * Peer-to-peer migration of a running domain: this libvirtd connects to dconnuri itself and drives the whole
 * protocol; QEMU's stream goes to migrate_uri and the disk copy (NBD) to disks_uri. Blocks its pool thread until the
 * migration ended; clv_job_stats and clv_abort_job may be called meanwhile from other threads. Empty strings: the
 * parameter is not given.
 */
clv_result *clv_migrate_to_uri3(virConnectPtr conn, const char *uuid, const char *dconnuri, const char *migrate_uri,
                                const char *disks_uri, const char *dest_xml, const char *disk_target, uint32_t flags)
{
    clv_result *r = result_new();
    virDomainPtr dom = lookup_domain(r, conn, uuid);
    if (!dom)
        return r;
    virTypedParameterPtr params = NULL;
    int count = 0, max = 0;
    const char *names[] = {VIR_MIGRATE_PARAM_URI, VIR_MIGRATE_PARAM_DISKS_URI, VIR_MIGRATE_PARAM_DEST_XML,
                           VIR_MIGRATE_PARAM_MIGRATE_DISKS};
    const char *values[] = {migrate_uri, disks_uri, dest_xml, disk_target};
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        if (optional(values[i]) && VIRT(r, virTypedParamsAddString, &params, &count, &max, names[i], values[i]) < 0) {
            capture_error(r);
            virt.virTypedParamsFree(params, count);
            return release_domain(r, dom);
        }
    }
    check_int(r, VIRT(r, virDomainMigrateToURI3, dom, dconnuri, params, (unsigned int)count, flags));
    virt.virTypedParamsFree(params, count);
    return release_domain(r, dom);
}

/* The domain's current job (a migration's progress) as JSON: {"type": N, "<field>": bytes or ms, ...}. */
clv_result *clv_job_stats(virConnectPtr conn, const char *uuid)
{
    clv_result *r = result_new();
    virDomainPtr dom = lookup_domain(r, conn, uuid);
    if (!dom)
        return r;
    int type = 0, count = 0;
    virTypedParameterPtr params = NULL;
    if (check_int(r, VIRT(r, virDomainGetJobStats, dom, &type, &params, &count, 0)) < 0)
        return release_domain(r, dom);
    const char *fields[][2] = {
        {VIR_DOMAIN_JOB_DATA_TOTAL, "data_total"},         {VIR_DOMAIN_JOB_DATA_PROCESSED, "data_processed"},
        {VIR_DOMAIN_JOB_DATA_REMAINING, "data_remaining"}, {VIR_DOMAIN_JOB_MEMORY_TOTAL, "memory_total"},
        {VIR_DOMAIN_JOB_MEMORY_PROCESSED, "memory_processed"}, {VIR_DOMAIN_JOB_DISK_TOTAL, "disk_total"},
        {VIR_DOMAIN_JOB_DISK_PROCESSED, "disk_processed"}, {VIR_DOMAIN_JOB_TIME_ELAPSED, "time_elapsed_ms"},
        {VIR_DOMAIN_JOB_DOWNTIME, "downtime_ms"},
    };
    char json[1024];
    int used = snprintf(json, sizeof json, "{\"type\":%d", type);
    for (size_t i = 0; i < sizeof fields / sizeof fields[0]; i++) {
        unsigned long long value;
        if (virt.virTypedParamsGetULLong(params, count, fields[i][0], &value) == 1)
            used += snprintf(json + used, sizeof json - (size_t)used, ",\"%s\":%llu", fields[i][1], value);
    }
    snprintf(json + used, sizeof json - (size_t)used, "}");
    virt.virTypedParamsFree(params, count);
    r->text = copy_string(json);
    return release_domain(r, dom);
}

/* Cancels the domain's current job (a migration: libvirt ends it on both sides, the domain runs on here). */
clv_result *clv_abort_job(virConnectPtr conn, const char *uuid)
{
    clv_result *r = result_new();
    virDomainPtr dom = lookup_domain(r, conn, uuid);
    if (dom)
        check_int(r, VIRT(r, virDomainAbortJob, dom));
    return release_domain(r, dom);
}

/* ---- QEMU's monitor (libvirt-qemu) ---- */

/*
 * virDomainQemuMonitorCommand lives in libvirt-qemu.so.0, which is dlopen()ed on first use only: the agent needs it
 * for one thing (a warm pool's forward, added at assignment), and a box without it still runs everything else. It
 * links libvirt.so.0 itself, which the loader shares with the copy clv_init opened, so errors land where
 * capture_error reads them.
 */
static __typeof__(virDomainQemuMonitorCommand) *qemu_monitor_command;
static pthread_once_t qemu_once = PTHREAD_ONCE_INIT;
static char qemu_dlerror[256];

static void load_libvirt_qemu(void)
{
    void *handle = dlopen("libvirt-qemu.so.0", RTLD_NOW | RTLD_LOCAL);
    if (handle)
        qemu_monitor_command = (__typeof__(virDomainQemuMonitorCommand) *)dlsym(handle, "virDomainQemuMonitorCommand");
    if (!qemu_monitor_command)
        snprintf(qemu_dlerror, sizeof qemu_dlerror, "%s", handle ? "libvirt-qemu.so.0 has no virDomainQemuMonitorCommand" : dlerror());
}

/* text = the monitor's reply. flags: VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP for a human monitor command. */
clv_result *clv_qemu_monitor_command(virConnectPtr conn, const char *uuid, const char *command, uint32_t flags)
{
    clv_result *r = result_new();
    pthread_once(&qemu_once, load_libvirt_qemu);
    if (!qemu_monitor_command) {
        r->failed = 1;
        r->err_domain = CLV_ERR_DOMAIN_SHIM;
        r->operation = "dlopen";
        r->err_message = copy_string(qemu_dlerror);
        return r;
    }
    virDomainPtr dom = lookup_domain(r, conn, uuid);
    char *reply = NULL;
    if (dom) {
        r->operation = "virDomainQemuMonitorCommand";
        if (qemu_monitor_command(dom, command, &reply, flags) < 0)
            capture_error(r);
        else
            r->text = reply ? reply : copy_string("");
    }
    return release_domain(r, dom);
}

/* ---- listing ---- */

static void write_json_string(FILE *out, const char *s)
{
    fputc('"', out);
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\')
            fprintf(out, "\\%c", c);
        else if (c < 0x20)
            fprintf(out, "\\u%04x", c);
        else
            fputc(c, out);
    }
    fputc('"', out);
}

/* Writes one domain as a JSON object. Returns 1 if written, 0 if it vanished meanwhile, -1 on error. */
static int write_domain_json(clv_result *r, FILE *out, virDomainPtr dom, int first)
{
    char uuid[VIR_UUID_STRING_BUFLEN];
    int state, reason, persistent, active;
    const char *name;
    if (VIRT(r, virDomainGetUUIDString, dom, uuid) < 0 || !(name = VIRT(r, virDomainGetName, dom)) ||
        VIRT(r, virDomainGetState, dom, &state, &reason, 0) < 0 ||
        (persistent = VIRT(r, virDomainIsPersistent, dom)) < 0 || (active = VIRT(r, virDomainIsActive, dom)) < 0) {
        virErrorPtr err = virt.virGetLastError();
        if (err && err->code == VIR_ERR_NO_DOMAIN)
            return 0;
        capture_error(r);
        return -1;
    }
    fprintf(out, "%s{\"uuid\":\"%s\",\"name\":", first ? "" : ",", uuid);
    write_json_string(out, name);
    fprintf(out, ",\"state\":%d,\"reason\":%d,\"persistent\":%s,\"active\":%s}", state, reason,
            persistent ? "true" : "false", active ? "true" : "false");
    return 1;
}

/* text = JSON array of {uuid, name, state, reason, persistent, active}. Domains that vanish while listing are skipped. */
clv_result *clv_list_domains(virConnectPtr conn, uint32_t flags)
{
    clv_result *r = result_new();
    virDomainPtr *doms = NULL;
    int count = VIRT(r, virConnectListAllDomains, conn, &doms, flags);
    if (count < 0) {
        capture_error(r);
        return r;
    }
    char *json = NULL;
    size_t json_len = 0;
    FILE *out = open_memstream(&json, &json_len);
    if (!out)
        abort();
    fputc('[', out);
    int written = 0;
    for (int i = 0; i < count; i++) {
        if (!r->failed) {
            int rc = write_domain_json(r, out, doms[i], written == 0);
            written += rc > 0;
        }
        virt.virDomainFree(doms[i]);
    }
    free(doms);
    fputc(']', out);
    fclose(out);
    if (r->failed)
        free(json);
    else
        r->text = json;
    return r;
}

/* ---- lifecycle events ---- */

/*
 * A lifecycle watch: libvirt's callback (on the event loop thread) appends (uuid, event, detail, time) to a queue,
 * and JS takes batches with clv_watch_next, a blocking call that runs on a pool thread. Two owners hold the watch:
 * libvirt (until it calls free_watch after deregistering) and JS (until clv_watch_next reports it closed).
 */
typedef struct clv_watch {
    pthread_mutex_t lock;
    pthread_cond_t changed;
    int callback_id;
    int owners;
    int closed;
    char *queued; /* JSON objects separated by commas */
    size_t queued_len, queued_cap;
} clv_watch;

static void drop_owner(clv_watch *w)
{
    pthread_mutex_lock(&w->lock);
    int last = --w->owners == 0;
    pthread_mutex_unlock(&w->lock);
    if (!last)
        return;
    free(w->queued);
    pthread_cond_destroy(&w->changed);
    pthread_mutex_destroy(&w->lock);
    free(w);
}

static void free_watch(void *opaque)
{
    drop_owner(opaque);
}

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static int on_lifecycle(virConnectPtr conn, virDomainPtr dom, int event, int detail, void *opaque)
{
    (void)conn;
    clv_watch *w = opaque;
    char uuid[VIR_UUID_STRING_BUFLEN], entry[160];
    if (virt.virDomainGetUUIDString(dom, uuid) < 0)
        return 0;
    pthread_mutex_lock(&w->lock);
    int len = snprintf(entry, sizeof entry, "%s{\"uuid\":\"%s\",\"event\":%d,\"detail\":%d,\"at_ms\":%lld}",
                       w->queued_len ? "," : "", uuid, event, detail, (long long)now_ms());
    if (w->queued_len + len + 1 > w->queued_cap) {
        w->queued_cap = (w->queued_len + len + 1) * 2;
        if (!(w->queued = realloc(w->queued, w->queued_cap)))
            abort();
    }
    memcpy(w->queued + w->queued_len, entry, len + 1);
    w->queued_len += len;
    pthread_cond_broadcast(&w->changed);
    pthread_mutex_unlock(&w->lock);
    return 0;
}

/* value = the watch (an integer for JS), for every domain's lifecycle events on conn. */
clv_result *clv_watch_lifecycle(virConnectPtr conn)
{
    clv_result *r = result_new();
    clv_watch *w = calloc(1, sizeof *w);
    if (!w)
        abort();
    pthread_mutex_init(&w->lock, NULL);
    pthread_cond_init(&w->changed, NULL);
    w->owners = 2;
    w->callback_id = VIRT(r, virConnectDomainEventRegisterAny, conn, NULL, VIR_DOMAIN_EVENT_ID_LIFECYCLE,
                          VIR_DOMAIN_EVENT_CALLBACK(on_lifecycle), w, free_watch);
    if (w->callback_id < 0) {
        capture_error(r);
        w->owners = 1; /* libvirt never took it */
        drop_owner(w);
        return r;
    }
    r->value = (int64_t)(uintptr_t)w;
    return r;
}

/*
 * Waits up to timeout_ms for events. text = JSON array of {uuid, event, detail, at_ms} (maybe empty); value = 1
 * once the watch is closed and drained, after which JS must not use it again (its ownership ends here).
 */
clv_result *clv_watch_next(clv_watch *w, uint32_t timeout_ms)
{
    clv_result *r = result_new();
    struct timespec deadline;
    clock_gettime(CLOCK_REALTIME, &deadline);
    deadline.tv_sec += timeout_ms / 1000;
    deadline.tv_nsec += (long)(timeout_ms % 1000) * 1000000;
    if (deadline.tv_nsec >= 1000000000) {
        deadline.tv_sec++;
        deadline.tv_nsec -= 1000000000;
    }
    pthread_mutex_lock(&w->lock);
    while (w->queued_len == 0 && !w->closed)
        if (pthread_cond_timedwait(&w->changed, &w->lock, &deadline) == ETIMEDOUT)
            break;
    size_t len = w->queued_len;
    if (!(r->text = malloc(len + 3)))
        abort();
    r->text[0] = '[';
    memcpy(r->text + 1, w->queued ? w->queued : "", len);
    strcpy(r->text + 1 + len, "]");
    w->queued_len = 0;
    int finished = w->closed && len == 0;
    pthread_mutex_unlock(&w->lock);
    r->value = finished;
    if (finished)
        drop_owner(w);
    return r;
}

/* Stops the callbacks and wakes a waiting clv_watch_next, which then reports the watch closed. */
clv_result *clv_watch_close(virConnectPtr conn, clv_watch *w)
{
    clv_result *r = result_new();
    check_int(r, VIRT(r, virConnectDomainEventDeregisterAny, conn, w->callback_id));
    pthread_mutex_lock(&w->lock);
    w->closed = 1;
    pthread_cond_broadcast(&w->changed);
    pthread_mutex_unlock(&w->lock);
    return r;
}
