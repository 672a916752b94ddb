//! The numbers of libvirt's C API that the launcher uses (libvirt's public headers; they are
//! part of libvirt's stable ABI and of its wire protocol).

// virErrorNumber.
pub const VIR_ERR_INTERNAL_ERROR: i32 = 1;
pub const VIR_ERR_SYSTEM_ERROR: i32 = 38;
pub const VIR_ERR_RPC: i32 = 39;
pub const VIR_ERR_NO_DOMAIN: i32 = 42;
pub const VIR_ERR_OPERATION_INVALID: i32 = 55;
pub const VIR_ERR_ARGUMENT_UNSUPPORTED: i32 = 74;
pub const VIR_ERR_OPERATION_UNSUPPORTED: i32 = 84;
pub const VIR_ERR_AGENT_UNRESPONSIVE: i32 = 86;

// virDomainQemuAgentCommandTimeoutValues (seconds otherwise).
pub const VIR_DOMAIN_QEMU_AGENT_COMMAND_BLOCK: i32 = -2;
pub const VIR_DOMAIN_QEMU_AGENT_COMMAND_DEFAULT: i32 = -1;
pub const VIR_DOMAIN_QEMU_AGENT_COMMAND_NOWAIT: i32 = 0;

// virDomainState.
pub const VIR_DOMAIN_NOSTATE: u32 = 0;
pub const VIR_DOMAIN_RUNNING: u32 = 1;
pub const VIR_DOMAIN_BLOCKED: u32 = 2;
pub const VIR_DOMAIN_PAUSED: u32 = 3;
pub const VIR_DOMAIN_SHUTDOWN: u32 = 4;
pub const VIR_DOMAIN_SHUTOFF: u32 = 5;
pub const VIR_DOMAIN_CRASHED: u32 = 6;
pub const VIR_DOMAIN_PMSUSPENDED: u32 = 7;

// virDomainShutoffReason.
pub const VIR_DOMAIN_SHUTOFF_UNKNOWN: u32 = 0;
pub const VIR_DOMAIN_SHUTOFF_SHUTDOWN: u32 = 1;
pub const VIR_DOMAIN_SHUTOFF_DESTROYED: u32 = 2;
pub const VIR_DOMAIN_SHUTOFF_CRASHED: u32 = 3;
pub const VIR_DOMAIN_SHUTOFF_MIGRATED: u32 = 4;
pub const VIR_DOMAIN_SHUTOFF_SAVED: u32 = 5;
pub const VIR_DOMAIN_SHUTOFF_FAILED: u32 = 6;
pub const VIR_DOMAIN_SHUTOFF_FROM_SNAPSHOT: u32 = 7;

// virDomainEventType and virDomainEventStoppedDetailType.
pub const VIR_DOMAIN_EVENT_DEFINED: u32 = 0;
pub const VIR_DOMAIN_EVENT_UNDEFINED: u32 = 1;
pub const VIR_DOMAIN_EVENT_STARTED: u32 = 2;
pub const VIR_DOMAIN_EVENT_SUSPENDED: u32 = 3;
pub const VIR_DOMAIN_EVENT_RESUMED: u32 = 4;
pub const VIR_DOMAIN_EVENT_STOPPED: u32 = 5;
pub const VIR_DOMAIN_EVENT_SHUTDOWN: u32 = 6;
pub const VIR_DOMAIN_EVENT_PMSUSPENDED: u32 = 7;
pub const VIR_DOMAIN_EVENT_CRASHED: u32 = 8;
pub const VIR_DOMAIN_EVENT_STOPPED_SHUTDOWN: u32 = 0;
pub const VIR_DOMAIN_EVENT_STOPPED_DESTROYED: u32 = 1;
pub const VIR_DOMAIN_EVENT_STOPPED_CRASHED: u32 = 2;
pub const VIR_DOMAIN_EVENT_STOPPED_MIGRATED: u32 = 3;
pub const VIR_DOMAIN_EVENT_STOPPED_SAVED: u32 = 4;
pub const VIR_DOMAIN_EVENT_STOPPED_FAILED: u32 = 5;
pub const VIR_DOMAIN_EVENT_STOPPED_FROM_SNAPSHOT: u32 = 6;

// virConnectDomainEventAgentLifecycleState.
pub const VIR_CONNECT_DOMAIN_EVENT_AGENT_LIFECYCLE_STATE_CONNECTED: u32 = 1;

// virDomainEventID: the events the launcher follows.
pub const VIR_DOMAIN_EVENT_ID_LIFECYCLE: i32 = 0;
pub const VIR_DOMAIN_EVENT_ID_REBOOT: i32 = 1;
pub const VIR_DOMAIN_EVENT_ID_WATCHDOG: i32 = 3;
pub const VIR_DOMAIN_EVENT_ID_IO_ERROR_REASON: i32 = 6;
pub const VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED: i32 = 15;
pub const VIR_DOMAIN_EVENT_ID_AGENT_LIFECYCLE: i32 = 18;
pub const VIR_DOMAIN_EVENT_ID_JOB_COMPLETED: i32 = 21;
pub const VIR_DOMAIN_EVENT_ID_DEVICE_REMOVAL_FAILED: i32 = 22;

// virDomainMemoryStatTags.
pub const VIR_DOMAIN_MEMORY_STAT_UNUSED: i32 = 4;
pub const VIR_DOMAIN_MEMORY_STAT_AVAILABLE: i32 = 5;
pub const VIR_DOMAIN_MEMORY_STAT_ACTUAL_BALLOON: i32 = 6;
pub const VIR_DOMAIN_MEMORY_STAT_RSS: i32 = 7;
/// `VIR_DOMAIN_MEMORY_STAT_NR` of libvirt 9.0: how many statistics to ask for.
pub const VIR_DOMAIN_MEMORY_STAT_NR: u32 = 13;

// Flags.
pub const VIR_DOMAIN_AFFECT_LIVE: u32 = 1;
pub const VIR_DOMAIN_AFFECT_CONFIG: u32 = 2;
/// virDomainVcpuFlags: the maximum rather than the current count.
pub const VIR_DOMAIN_VCPU_MAXIMUM: u32 = 4;
pub const VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN: u32 = 1;
pub const VIR_DOMAIN_REBOOT_ACPI_POWER_BTN: u32 = 1;
pub const VIR_DOMAIN_XML_SECURE: u32 = 1;
pub const VIR_DOMAIN_XML_MIGRATABLE: u32 = 8;
pub const VIR_DOMAIN_BLOCK_RESIZE_BYTES: u32 = 1;
pub const VIR_DOMAIN_JOB_STATS_COMPLETED: u32 = 1;
pub const VIR_DOMAIN_JOB_STATS_KEEP_COMPLETED: u32 = 2;
/// `virDomainBackupBeginFlags`: the push-mode targets exist already (created by the caller).
pub const VIR_DOMAIN_BACKUP_BEGIN_REUSE_EXTERNAL: u32 = 1;

// virDomainJobType.
pub const VIR_DOMAIN_JOB_NONE: i32 = 0;
pub const VIR_DOMAIN_JOB_COMPLETED: i32 = 3;

// virDomainMigrateFlags.
pub const VIR_MIGRATE_LIVE: u32 = 1;
pub const VIR_MIGRATE_PEER2PEER: u32 = 2;
pub const VIR_MIGRATE_PERSIST_DEST: u32 = 8;
pub const VIR_MIGRATE_PAUSED: u32 = 32;
pub const VIR_MIGRATE_NON_SHARED_DISK: u32 = 64;
pub const VIR_MIGRATE_UNSAFE: u32 = 512;
pub const VIR_MIGRATE_AUTO_CONVERGE: u32 = 8192;
pub const VIR_MIGRATE_POSTCOPY: u32 = 32768;
pub const VIR_MIGRATE_PARALLEL: u32 = 131072;

// Migration parameters (VIR_MIGRATE_PARAM_*).
pub const VIR_MIGRATE_PARAM_URI: &str = "migrate_uri";
pub const VIR_MIGRATE_PARAM_DEST_XML: &str = "destination_xml";
pub const VIR_MIGRATE_PARAM_BANDWIDTH: &str = "bandwidth";
pub const VIR_MIGRATE_PARAM_PARALLEL_CONNECTIONS: &str = "parallel.connections";
pub const VIR_MIGRATE_PARAM_DISKS_URI: &str = "disks_uri";
pub const VIR_MIGRATE_PARAM_MIGRATE_DISKS: &str = "migrate_disks";
