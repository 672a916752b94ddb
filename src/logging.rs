//! Logging: one JSON object per line on stderr (pod logs), or readable text on a terminal.
//!
//! The JSON lines are tracing-subscriber's flattened shape (`timestamp`, `level`, `message`,
//! the fields, `target`), written by [`JsonLines`] so that a field holding a JSON object (a
//! domain `event`) is that object, not a string of escaped JSON.

use std::fmt;
use std::io::IsTerminal;

use serde_json::Value;
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::EnvFilter;

/// Fields whose text is embedded as JSON when it is a JSON object.
const JSON_FIELDS: [&str; 1] = ["event"];

/// Installs the global subscriber. `RUST_LOG` overrides the default level (`info`).
pub fn init(force_json: bool) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| Tee);
    if force_json || !std::io::stderr().is_terminal() {
        builder.event_format(JsonLines).init();
    } else {
        builder.compact().init();
    }
}

/// The launcher's log as a file too (`launcherctl logs`): set once the runtime directory is
/// known ([`also_to_file`]); lines before that go to stderr only.
static FILE: std::sync::OnceLock<std::sync::Mutex<LogFile>> = std::sync::OnceLock::new();

struct LogFile {
    path: std::path::PathBuf,
    file: std::fs::File,
    len: u64,
    max: u64,
}

/// From now on every log line also goes to `path` (created or appended to), rotated to
/// `<path>.1` when it reaches `max_bytes`. Once per process; later calls are ignored.
pub fn also_to_file(path: &std::path::Path, max_bytes: u64) -> std::io::Result<()> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    let len = file.metadata()?.len();
    let _ = FILE.set(std::sync::Mutex::new(LogFile {
        path: path.to_path_buf(),
        file,
        len,
        max: max_bytes,
    }));
    Ok(())
}

/// The file the log also goes to, if any.
pub fn file() -> Option<std::path::PathBuf> {
    FILE.get()
        .and_then(|f| f.lock().ok().map(|f| f.path.clone()))
}

/// stderr, and the log file when there is one.
struct Tee;

impl std::io::Write for Tee {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = std::io::stderr().write(buf)?;
        if let Some(Ok(mut f)) = FILE.get().map(|f| f.lock()) {
            if f.len + n as u64 > f.max && f.len > 0 {
                // Rotated as the console log is: the old lines as `<file>.1`, a new file.
                let mut old = f.path.as_os_str().to_owned();
                old.push(".1");
                let reopened = std::fs::rename(&f.path, &old).and_then(|()| {
                    std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(&f.path)
                });
                if let Ok(file) = reopened {
                    f.file = file;
                    f.len = 0;
                }
            }
            if f.file.write_all(&buf[..n]).is_ok() {
                f.len += n as u64;
            }
        }
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

/// One JSON object per event.
pub struct JsonLines;

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let mut timestamp = String::new();
        SystemTime.format_time(&mut Writer::new(&mut timestamp))?;
        let meta = event.metadata();
        // In this order (serde_json's maps would sort the keys).
        let mut fields = Fields(vec![
            ("timestamp".into(), Value::String(timestamp)),
            ("level".into(), Value::String(meta.level().to_string())),
        ]);
        event.record(&mut fields);
        fields
            .0
            .push(("target".into(), Value::String(meta.target().to_string())));
        let mut line = String::from("{");
        for (i, (key, value)) in fields.0.iter().enumerate() {
            if i > 0 {
                line.push(',');
            }
            line.push_str(&Value::String(key.clone()).to_string());
            line.push(':');
            line.push_str(&value.to_string());
        }
        line.push('}');
        writeln!(writer, "{line}")
    }
}

/// An event's fields as JSON values: numbers and booleans as such, text as strings, and the
/// [`JSON_FIELDS`] as the object they hold.
struct Fields(Vec<(String, Value)>);

impl Fields {
    fn text(&mut self, field: &Field, text: String) {
        let value = if JSON_FIELDS.contains(&field.name()) && text.starts_with('{') {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        } else {
            Value::String(text)
        };
        self.0.push((field.name().to_string(), value));
    }
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.text(field, value.to_string());
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.text(field, format!("{value:?}"));
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.text(field, value.to_string());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.push((field.name().to_string(), value.into()));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.push((field.name().to_string(), value.into()));
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.push((field.name().to_string(), value.into()));
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.push((field.name().to_string(), value.into()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn fields_are_plain_json_values_and_events_are_objects() {
        let buf = Buf::default();
        let out = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || out.clone())
            .event_format(JsonLines)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            let ev = r#"{"type":"lifecycle","domain":"default_x","kind":"started"}"#;
            tracing::info!(event = %ev, elapsed_ms = 12.5, pid = 7u64, ok = true, path = %"/a b", "domain event");
            tracing::warn!(event = %"not {json", "odd");
        });
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2, "{text}");
        let first = &lines[0];
        assert_eq!(first["message"], "domain event");
        assert_eq!(first["level"], "INFO");
        assert_eq!(first["event"]["kind"], "started");
        assert_eq!(first["elapsed_ms"], 12.5);
        assert_eq!(first["pid"], 7);
        assert_eq!(first["ok"], true);
        assert_eq!(first["path"], "/a b");
        assert!(
            first["timestamp"].as_str().unwrap().ends_with('Z'),
            "{first}"
        );
        assert_eq!(first["target"], module_path!());
        assert_eq!(lines[1]["event"], "not {json");
        assert!(text.starts_with("{\"timestamp\":"), "{text}");
        assert!(
            text.contains("\"level\":\"INFO\",\"message\":\"domain event\",\"event\":{"),
            "{text}"
        );
    }
}
