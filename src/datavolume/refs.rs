//! ConfigMaps and Secrets a DataVolume names (`certConfigMap`, `secretRef`,
//! `secretExtraHeaders`). Standalone there is no API server: they are documents of the same
//! manifest file as the VirtualMachine, as `kubectl apply -f` takes it (`---`-separated
//! YAML, or a JSON `List`'s items are not read). Only objects of the VM's namespace count
//! (a document without `metadata.namespace` is in it), as in a cluster.

use std::collections::BTreeMap;

use base64::Engine;
use serde_json::Value;

use super::DataVolumeError;
use crate::spec::Manifest;

/// The ConfigMaps and Secrets of a manifest in one namespace: name → key → bytes.
#[derive(Debug, Default)]
pub struct Objects {
    /// The manifest's file, for messages.
    pub origin: String,
    pub config_maps: BTreeMap<String, BTreeMap<String, Vec<u8>>>,
    pub secrets: BTreeMap<String, BTreeMap<String, Vec<u8>>>,
}

/// Collect `namespace`'s `v1` ConfigMaps (`data`, `binaryData` base64) and Secrets (`data`
/// base64, `stringData` plain and winning over `data`, as the API server merges them).
pub fn collect(manifest: &Manifest, namespace: &str) -> Result<Objects, DataVolumeError> {
    let mut objects = Objects {
        origin: manifest.origin.clone(),
        ..Objects::default()
    };
    let load_err = |reason: String| DataVolumeError::Load {
        file: manifest.origin.clone(),
        reason,
    };
    for doc in &manifest.docs {
        let kind = doc.get("kind").and_then(Value::as_str).unwrap_or_default();
        if kind != "ConfigMap" && kind != "Secret" {
            continue;
        }
        let meta = doc.get("metadata");
        let name = meta
            .and_then(|m| m.get("name"))
            .and_then(Value::as_str)
            .unwrap_or_default();
        if name.is_empty() {
            return Err(load_err(format!("a {kind} has no metadata.name")));
        }
        let ns = meta
            .and_then(|m| m.get("namespace"))
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty());
        if ns.is_some_and(|n| n != namespace) {
            continue;
        }
        let map =
            |field: &str, base64: bool| -> Result<BTreeMap<String, Vec<u8>>, DataVolumeError> {
                let mut out = BTreeMap::new();
                let Some(v) = doc.get(field) else {
                    return Ok(out);
                };
                let Some(entries) = v.as_object() else {
                    if v.is_null() {
                        return Ok(out);
                    }
                    return Err(load_err(format!("{kind} {name}: {field} is not a map")));
                };
                for (key, value) in entries {
                    let Some(text) = value.as_str() else {
                        return Err(load_err(format!(
                            "{kind} {name}: {field}.{key} is not a string"
                        )));
                    };
                    let bytes = if base64 {
                        base64::engine::general_purpose::STANDARD
                            .decode(text.trim())
                            .map_err(|e| {
                                load_err(format!("{kind} {name}: {field}.{key} is not base64: {e}"))
                            })?
                    } else {
                        text.as_bytes().to_vec()
                    };
                    out.insert(key.clone(), bytes);
                }
                Ok(out)
            };
        let (target, data) = if kind == "ConfigMap" {
            let mut data = map("data", false)?;
            data.extend(map("binaryData", true)?);
            (&mut objects.config_maps, data)
        } else {
            let mut data = map("data", true)?;
            data.extend(map("stringData", false)?);
            (&mut objects.secrets, data)
        };
        if target.insert(name.to_string(), data).is_some() {
            return Err(load_err(format!("{kind} {name} appears twice")));
        }
    }
    Ok(objects)
}

impl Objects {
    /// `key` of ConfigMap or Secret `name`; the reason it is missing otherwise.
    pub fn value(&self, kind: &str, name: &str, key: &str) -> Result<&[u8], String> {
        let set = if kind == "ConfigMap" {
            &self.config_maps
        } else {
            &self.secrets
        };
        let Some(data) = set.get(name) else {
            return Err(format!(
                "{kind} {name:?} is not in {} (standalone, it is a document of the VM's manifest, as kubectl apply -f takes it)",
                self.origin
            ));
        };
        data.get(key)
            .map(Vec::as_slice)
            .ok_or_else(|| format!("{kind} {name:?} has no key {key:?}"))
    }

    /// Every value of Secret `name` (for `secretExtraHeaders`).
    pub fn secret_values(&self, name: &str) -> Result<Vec<&[u8]>, String> {
        match self.secrets.get(name) {
            Some(d) => Ok(d.values().map(Vec::as_slice).collect()),
            None => Err(format!(
                "Secret {name:?} is not in {} (standalone, it is a document of the VM's manifest, as kubectl apply -f takes it)",
                self.origin
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_maps_and_secrets_of_the_namespace_are_read() {
        let text = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: ca\ndata:\n  ca.pem: PEM\n---\n\
            apiVersion: v1\nkind: Secret\nmetadata:\n  name: creds\n  namespace: default\ndata:\n  accessKeyId: dXNlcg==\nstringData:\n  secretKey: pass\n---\n\
            apiVersion: v1\nkind: Secret\nmetadata:\n  name: other\n  namespace: elsewhere\nstringData:\n  a: b\n---\n\
            apiVersion: kubevirt.io/v1\nkind: VirtualMachine\nmetadata:\n  name: vm\n";
        let m = Manifest::parse(text, "vm.yaml").unwrap();
        let o = collect(&m, "default").unwrap();
        assert_eq!(o.value("ConfigMap", "ca", "ca.pem").unwrap(), b"PEM");
        assert_eq!(o.value("Secret", "creds", "accessKeyId").unwrap(), b"user");
        assert_eq!(o.value("Secret", "creds", "secretKey").unwrap(), b"pass");
        assert!(o
            .value("Secret", "other", "a")
            .unwrap_err()
            .starts_with("Secret \"other\" is not in vm.yaml"));
        assert_eq!(
            o.value("Secret", "creds", "nope").unwrap_err(),
            "Secret \"creds\" has no key \"nope\""
        );
    }

    #[test]
    fn bad_base64_names_the_object_and_key() {
        let text = "kind: Secret\nmetadata:\n  name: s\ndata:\n  k: '***'\n";
        let m = Manifest::parse(text, "vm.yaml").unwrap();
        let e = collect(&m, "default").unwrap_err().to_string();
        assert!(
            e.starts_with("vm.yaml: Secret s: data.k is not base64"),
            "{e}"
        );
    }
}
