//! Connection URLs that may hold credentials.
//!
//! A [`SecretUrl`]'s `Debug` and `Display` show the URL with its password and its secret
//! query options replaced by `***`, so a URL can go into a log line, an error or the
//! status page without anyone having to remember to redact it. The real value comes out
//! only through [`SecretUrl::expose`], which the two clients call once, at start.

use std::fmt;

/// Query options whose values are credentials (compared without case). MongoDB's
/// `authMechanismProperties` can carry an AWS session token.
const SECRET_OPTIONS: &[&str] = &[
    "password",
    "secret",
    "token",
    "authmechanismproperties",
    "sslclientcertificatekeypassword",
    "tlscertificatekeyfilepassword",
];

#[derive(Clone, PartialEq, Eq)]
pub struct SecretUrl(String);

impl SecretUrl {
    pub fn new(url: impl Into<String>) -> Self {
        SecretUrl(url.into())
    }

    /// clap's value parser: accepts anything, so that clap never quotes the value in an
    /// error; [`crate::config::Config::validate`] checks it and names it redacted.
    pub fn parse_arg(s: &str) -> Result<SecretUrl, std::convert::Infallible> {
        Ok(SecretUrl::new(s))
    }

    /// The URL with its credentials, for the client that connects with it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Fails unless the URL starts with one of `schemes` followed by `://`.
    pub fn check_scheme(&self, schemes: &[&str]) -> Result<(), String> {
        let ok = schemes
            .iter()
            .any(|s| self.0.strip_prefix(s).is_some_and(|r| r.starts_with("://")));
        if ok {
            Ok(())
        } else {
            let wanted: Vec<String> = schemes.iter().map(|s| format!("{s}://")).collect();
            Err(format!("must start with {}", wanted.join(" or ")))
        }
    }

    fn redacted(&self) -> String {
        let url = &self.0;
        let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
            return "***".into();
        };
        let authority_end = url[scheme_end..]
            .find(['/', '?'])
            .map_or(url.len(), |i| scheme_end + i);
        let mut out = url[..scheme_end].to_string();
        match url[scheme_end..authority_end].rfind('@') {
            Some(at) => {
                let userinfo = &url[scheme_end..scheme_end + at];
                match userinfo.split_once(':') {
                    Some((user, _)) => out.push_str(&format!("{user}:***")),
                    None => out.push_str(userinfo),
                }
                out.push_str(&url[scheme_end + at..authority_end]);
            }
            None => out.push_str(&url[scheme_end..authority_end]),
        }
        let rest = &url[authority_end..];
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        out.push_str(path);
        if !rest.contains('?') {
            return out;
        }
        let options: Vec<String> = query
            .split('&')
            .map(|pair| match pair.split_once('=') {
                Some((name, _)) if is_secret(name) => format!("{name}=***"),
                _ => pair.to_string(),
            })
            .collect();
        out.push('?');
        out.push_str(&options.join("&"));
        out
    }
}

fn is_secret(option: &str) -> bool {
    let option = option.to_ascii_lowercase();
    SECRET_OPTIONS.iter().any(|s| option.contains(s))
}

impl fmt::Display for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretUrl({:?})", self.redacted())
    }
}

#[cfg(test)]
mod tests {
    use super::SecretUrl;

    fn shown(url: &str) -> String {
        SecretUrl::new(url).to_string()
    }

    #[test]
    fn passwords_never_survive() {
        assert_eq!(
            shown("mongodb://admin:s3cr%40t@mongo:27017/assessmentdb?authSource=admin"),
            "mongodb://admin:***@mongo:27017/assessmentdb?authSource=admin"
        );
        assert_eq!(
            shown("redis://:hunter2@redis:6379"),
            "redis://:***@redis:6379"
        );
        assert_eq!(
            shown("mongodb://mongo:27017/db"),
            "mongodb://mongo:27017/db"
        );
        assert_eq!(shown("redis://user@redis"), "redis://user@redis");
    }

    #[test]
    fn secret_options_never_survive() {
        let url = "mongodb://m/db?authMechanism=MONGODB-AWS&authMechanismProperties=AWS_SESSION_TOKEN:abc&tlsCertificateKeyFilePassword=pw&appName=x";
        let shown = shown(url);
        assert!(!shown.contains("abc") && !shown.contains("pw&"), "{shown}");
        assert!(shown.ends_with("appName=x"), "{shown}");
        let debug = format!(
            "{:?}",
            SecretUrl::new("redis://u:hunter2@r?password=hunter3")
        );
        assert!(!debug.contains("hunter"), "{debug}");
    }

    #[test]
    fn garbage_shows_nothing() {
        assert_eq!(shown("hunter2"), "***");
    }
}
