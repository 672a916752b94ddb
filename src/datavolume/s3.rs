//! `source.s3`: an object of an S3-compatible store, as CDI reads it.
//!
//! The URL is path-style, `<scheme>://<endpoint>/<bucket>/<key>`: the endpoint is the URL's
//! host (and port), the bucket the first path segment, the key the rest. `http://` talks plain
//! HTTP; `https://` and `s3://` talk TLS. The region is CDI's guess from the endpoint: `X` of
//! `s3.X.amazonaws.com`, otherwise the endpoint's first DNS label (S3-compatible stores such as
//! MinIO, Ceph RGW or moto accept any region). Requests are signed with AWS Signature
//! Version 4 in the `Authorization` header (`aws-sigv4`, the AWS SDK's signer), with an
//! unsigned payload, each attempt afresh; without a `secretRef` the request is anonymous.

use std::time::SystemTime;

use aws_sigv4::http_request::{
    sign, PayloadChecksumKind, PercentEncodingMode, SignableBody, SignableRequest, SigningSettings,
    UriPathNormalizationMode,
};
use aws_sigv4::sign::v4;

use super::http::RequestSource;

/// A parsed `source.s3.url`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectUrl {
    /// `http` or `https`.
    pub scheme: &'static str,
    /// Host and port, as written.
    pub endpoint: String,
    pub bucket: String,
    /// The object key, as written (percent-encoding kept).
    pub key: String,
    pub region: String,
}

impl ObjectUrl {
    pub fn parse(url: &str) -> Result<ObjectUrl, String> {
        let (scheme, rest) = if let Some(r) = url.strip_prefix("https://") {
            ("https", r)
        } else if let Some(r) = url.strip_prefix("s3://") {
            ("https", r)
        } else if let Some(r) = url.strip_prefix("http://") {
            ("http", r)
        } else {
            return Err("not an s3://, https:// or http:// URL".into());
        };
        let rest = rest.split(['?', '#']).next().unwrap_or_default();
        let (endpoint, path) = rest.split_once('/').unwrap_or((rest, ""));
        if endpoint.is_empty() || endpoint.contains('@') {
            return Err(
                "names no endpoint host (path-style: <scheme>://<endpoint>/<bucket>/<key>)".into(),
            );
        }
        let path = path.trim_matches('/');
        let (bucket, key) = path.split_once('/').unwrap_or((path, ""));
        if bucket.is_empty() {
            return Err(
                "names no bucket (path-style: <scheme>://<endpoint>/<bucket>/<key>)".into(),
            );
        }
        if key.is_empty() {
            return Err(
                "names no object key (path-style: <scheme>://<endpoint>/<bucket>/<key>)".into(),
            );
        }
        Ok(ObjectUrl {
            scheme,
            endpoint: endpoint.to_string(),
            bucket: bucket.to_string(),
            key: key.to_string(),
            region: region_of(endpoint),
        })
    }

    pub fn http_url(&self) -> String {
        format!(
            "{}://{}/{}/{}",
            self.scheme, self.endpoint, self.bucket, self.key
        )
    }
}

/// CDI's region: `X` of `s3.X.amazonaws.com`, else the first label of the endpoint.
fn region_of(endpoint: &str) -> String {
    let host = endpoint.split(':').next().unwrap_or(endpoint);
    if let Some(rest) = host.strip_suffix(".amazonaws.com") {
        if let Some(i) = rest.find("s3.") {
            let region = &rest[i + 3..];
            if !region.is_empty() {
                return region.to_string();
            }
        }
    }
    endpoint.split('.').next().unwrap_or(endpoint).to_string()
}

/// The access key id and secret key of a `secretRef` (CDI's `accessKeyId` and `secretKey`).
#[derive(Clone)]
pub struct Credentials {
    pub access_key_id: String,
    pub secret_key: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credentials({}, <secret>)", self.access_key_id)
    }
}

/// A GET of the object, signed anew for each attempt.
pub struct S3Request {
    pub object: ObjectUrl,
    pub credentials: Option<Credentials>,
}

impl RequestSource for S3Request {
    fn request(&self) -> Result<(String, Vec<(String, String)>), String> {
        let url = self.object.http_url();
        let Some(c) = &self.credentials else {
            return Ok((url, Vec::new()));
        };
        let headers = signed_headers(&url, &self.object.region, c, SystemTime::now())?;
        Ok((url, headers))
    }
}

/// The SigV4 headers (`authorization`, `x-amz-date`, `x-amz-content-sha256`) of a GET of `url`.
fn signed_headers(
    url: &str,
    region: &str,
    c: &Credentials,
    time: SystemTime,
) -> Result<Vec<(String, String)>, String> {
    let identity = aws_credential_types::Credentials::new(
        &c.access_key_id,
        &c.secret_key,
        None,
        None,
        "secretRef",
    )
    .into();
    let mut settings = SigningSettings::default();
    settings.payload_checksum_kind = PayloadChecksumKind::XAmzSha256;
    settings.percent_encoding_mode = PercentEncodingMode::Single;
    settings.uri_path_normalization_mode = UriPathNormalizationMode::Disabled;
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region(region)
        .name("s3")
        .time(time)
        .settings(settings)
        .build()
        .map_err(|e| format!("cannot sign the request: {e}"))?
        .into();
    let request = SignableRequest::new(
        "GET",
        url,
        std::iter::empty(),
        SignableBody::UnsignedPayload,
    )
    .map_err(|e| format!("cannot sign the request: {e}"))?;
    let (instructions, _) = sign(request, &params)
        .map_err(|e| format!("cannot sign the request: {e}"))?
        .into_parts();
    Ok(instructions
        .headers()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_style_urls_as_cdi_reads_them() {
        let u = ObjectUrl::parse("http://s3.us-west-2.amazonaws.com/my-bucket/images/disk.qcow2")
            .unwrap();
        assert_eq!(u.scheme, "http");
        assert_eq!(u.endpoint, "s3.us-west-2.amazonaws.com");
        assert_eq!(u.bucket, "my-bucket");
        assert_eq!(u.key, "images/disk.qcow2");
        assert_eq!(u.region, "us-west-2");
        let u = ObjectUrl::parse("s3://minio.example.com:9000/b/k.img").unwrap();
        assert_eq!(u.scheme, "https");
        assert_eq!(u.region, "minio");
        assert_eq!(u.http_url(), "https://minio.example.com:9000/b/k.img");
        assert_eq!(
            ObjectUrl::parse("http://127.0.0.1:5000/b/k")
                .unwrap()
                .region,
            "127"
        );
        for bad in [
            "ftp://h/b/k",
            "s3:///b/k",
            "s3://h",
            "s3://h/b",
            "s3://h/b/",
        ] {
            assert!(ObjectUrl::parse(bad).is_err(), "{bad}");
        }
    }

    /// The signature of AWS's documented GetObject example (SigV4, header form).
    #[test]
    fn signature_matches_aws_example() {
        let c = Credentials {
            access_key_id: "AKIAIOSFODNN7EXAMPLE".into(),
            secret_key: "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY".into(),
        };
        let t = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_369_353_600);
        let h = signed_headers(
            "https://examplebucket.s3.amazonaws.com/test.txt",
            "us-east-1",
            &c,
            t,
        )
        .unwrap();
        let auth = h
            .iter()
            .find(|(k, _)| k == "authorization")
            .map(|(_, v)| v.as_str())
            .unwrap();
        assert!(
            auth.starts_with("AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request, SignedHeaders=host;x-amz-content-sha256;x-amz-date, Signature="),
            "{auth}"
        );
        assert!(h
            .iter()
            .any(|(k, v)| k == "x-amz-content-sha256" && v == "UNSIGNED-PAYLOAD"));
    }
}
