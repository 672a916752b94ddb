//! virt-handler's migration options: the JSON of its `cmdclient.MigrationOptions` in
//! `MigrationRequest.options`, with Go's field names (`pkg/virt-handler/cmd-client/client.go`,
//! built at `migration-source.go:537-572`). Decoded strictly: a missing document, an unknown
//! field or a wrong type is an error naming the field.

use serde::Deserialize;

use crate::spec::Quantity;
use crate::vm::migration::MigrateOptions;

/// `cmdclient.MigrationOptions`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "PascalCase")]
pub struct MigrationOptions {
    /// MiB/s intent as a quantity; "0": unlimited.
    pub bandwidth: Option<Quantity>,
    /// Seconds without progress before the migration is aborted.
    pub progress_timeout: i64,
    #[serde(rename = "CompletionTimeoutPerGiB")]
    pub completion_timeout_per_gib: i64,
    pub max_downtime_ms: u64,
    pub unsafe_migration: bool,
    pub allow_auto_converge: bool,
    pub allow_post_copy: bool,
    /// Absent for VMIs with a CPU limit or dedicated CPUs.
    pub parallel_migration_threads: Option<u32>,
    pub allow_workload_disruption: bool,
    /// Only with the stall-detection feature gate; not acted on.
    pub stall_detector_options: Option<serde_json::Value>,
    /// e.g. "zstd"; not acted on.
    pub compression: Option<String>,
    /// Only with its feature gate; not acted on.
    pub downtime_tuning: Option<serde_json::Value>,
}

/// The field the options arrive in.
const FIELD: &str = "MigrationRequest.options";

impl MigrationOptions {
    /// Decodes the request's options; the error names the field.
    pub fn decode(bytes: &[u8]) -> Result<MigrationOptions, String> {
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Err(format!("{FIELD}: required (the migration options JSON)"));
        }
        // serde would also read a struct from a JSON list; Go's encoding/json does not.
        if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
            return Err(format!("{FIELD}: a JSON object expected"));
        }
        let mut de = serde_json::Deserializer::from_slice(bytes);
        let o: MigrationOptions = serde_path_to_error::deserialize(&mut de).map_err(|e| {
            let path = e.path().to_string();
            let at = if path == "." {
                FIELD.to_string()
            } else {
                format!("{FIELD}.{path}")
            };
            format!("{at}: {}", e.inner())
        })?;
        if let Some(b) = &o.bandwidth {
            b.value().map_err(|e| format!("{FIELD}.Bandwidth: {e}"))?;
        }
        for (name, v) in [
            ("ProgressTimeout", o.progress_timeout),
            ("CompletionTimeoutPerGiB", o.completion_timeout_per_gib),
        ] {
            if v < 0 {
                return Err(format!("{FIELD}.{name}: {v} is negative"));
            }
        }
        Ok(o)
    }

    /// The core's options for these (block migration: whether the VMI has local disks, the
    /// caller's to say).
    pub fn to_core(&self, block_migration: bool) -> MigrateOptions {
        MigrateOptions {
            bandwidth_mib: self
                .bandwidth
                .as_ref()
                .and_then(|b| b.value().ok())
                .map_or(0, |bytes| bytes >> 20),
            max_downtime_ms: self.max_downtime_ms,
            completion_timeout_per_gib: self.completion_timeout_per_gib.max(0) as u64,
            progress_timeout: self.progress_timeout.max(0) as u64,
            allow_post_copy: self.allow_post_copy,
            allow_auto_converge: self.allow_auto_converge,
            parallel_connections: self.parallel_migration_threads.unwrap_or(0),
            block_migration,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_handlers_options_decode() {
        let json = br#"{"Bandwidth":"64Mi","ProgressTimeout":150,"CompletionTimeoutPerGiB":150,
            "MaxDowntimeMs":900,"UnsafeMigration":false,"AllowAutoConverge":false,
            "AllowPostCopy":true,"ParallelMigrationThreads":8,"AllowWorkloadDisruption":false,
            "StallDetectorOptions":null,"Compression":null,"DowntimeTuning":null}"#;
        let o = MigrationOptions::decode(json).unwrap();
        assert_eq!(o.parallel_migration_threads, Some(8));
        let c = o.to_core(true);
        assert_eq!(c.bandwidth_mib, 64);
        assert_eq!(c.max_downtime_ms, 900);
        assert_eq!(c.completion_timeout_per_gib, 150);
        assert!(c.allow_post_copy && c.block_migration);
        assert_eq!(c.parallel_connections, 8);
        let unlimited = MigrationOptions::decode(br#"{"Bandwidth":"0"}"#).unwrap();
        assert_eq!(unlimited.to_core(false).bandwidth_mib, 0);
    }

    #[test]
    fn bad_options_name_the_field() {
        for (json, field) in [
            (&b""[..], "MigrationRequest.options: required"),
            (
                b"{\"Bandwith\":\"0\"}",
                "MigrationRequest.options.Bandwith: unknown field `Bandwith`",
            ),
            (
                b"{\"MaxDowntimeMs\":\"soon\"}",
                "MigrationRequest.options.MaxDowntimeMs:",
            ),
            (
                b"{\"Bandwidth\":\"fast\"}",
                "MigrationRequest.options.Bandwidth:",
            ),
            (
                b"{\"ProgressTimeout\":-1}",
                "MigrationRequest.options.ProgressTimeout:",
            ),
            (b"\"fast\"", "MigrationRequest.options: a JSON object"),
            (b"[1]", "MigrationRequest.options: a JSON object"),
        ] {
            let e = MigrationOptions::decode(json).unwrap_err();
            assert!(e.starts_with(field), "{e}");
        }
    }
}
