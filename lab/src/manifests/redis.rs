//! Redis' password: Redis asks for it (`--requirepass` from the Secret redis-auth), sluice
//! carries the same one in REDIS_URL, and the readiness probe tells a wrong password from
//! a right one.

use serde_yaml::Value;

use super::{expect, seq, show, Manifests, NULL};
use crate::k8s::find;
use crate::util::Error;

/// Redis asks for the password in its Secret, sluice's REDIS_URL carries that same
/// password, and Redis' readiness wants PONG, not only redis-cli's exit status.
pub(super) fn problems(m: &Manifests) -> Result<Vec<String>, Error> {
    let mut p = vec![];
    let redis = m.redis_objects();
    let auth = find(&redis, "Secret", "redis-auth")?;
    let password = match &auth["stringData"]["password"] {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => show(other),
    };
    if password.len() < 24 || !password.chars().all(|c| c.is_ascii_alphanumeric()) {
        p.push("Secret redis-auth: password must be 24 or more letters and digits (no URL escaping needed)".into());
    }
    let url = find(&m.app, "Secret", "sluice-secrets")?["stringData"]["REDIS_URL"]
        .as_str()
        .unwrap_or_default();
    match redis_url_password(url) {
        None => p.push("REDIS_URL must read redis://:PASSWORD@redis:6379".into()),
        Some(pw) if pw != password => {
            p.push("REDIS_URL's password is not the one in Secret redis-auth".into())
        }
        Some(_) => {}
    }
    let c = &find(&redis, "Deployment", "redis")?["spec"]["template"]["spec"]["containers"][0];
    let env = seq(&c["env"])
        .filter(|e| e["name"] == "REDISCLI_AUTH")
        .last()
        .unwrap_or(&NULL);
    let secret_ref = &env["valueFrom"]["secretKeyRef"];
    expect(
        &mut p,
        "redis env REDISCLI_AUTH (redis-cli's password variable) from",
        &(&secret_ref["name"], &secret_ref["key"]),
        &(&"redis-auth".into(), &"password".into()),
    );
    let args: Vec<&Value> = seq(&c["args"]).collect();
    let requirepass = args.iter().position(|a| *a == "--requirepass");
    if requirepass
        .and_then(|i| args.get(i + 1))
        .is_none_or(|a| **a != "$(REDISCLI_AUTH)")
    {
        p.push("redis args must include --requirepass $(REDISCLI_AUTH)".into());
    }
    let ready: Vec<&str> = seq(&c["readinessProbe"]["exec"]["command"])
        .filter_map(Value::as_str)
        .collect();
    let ready = ready.join(" ");
    if !ready.contains("redis-cli ping") || !compares_with_pong(&ready) {
        p.push(
            "redis readiness must compare redis-cli ping's reply with PONG (it exits 0 on NOAUTH)"
                .into(),
        );
    }
    // The file of the last object of `kind`.
    let file = |kind: &str| {
        m.redis
            .iter()
            .rev()
            .find(|(_, d)| d["kind"] == kind)
            .map_or("", |(f, _)| f.as_str())
    };
    let (secret, deployment) = (file("Secret"), file("Deployment"));
    if secret >= deployment {
        p.push(format!("{secret} must sort before {deployment} (kubectl apply -f k8s/redis/ creates the Secret first)"));
    }
    Ok(p)
}

/// The password of a URL that reads exactly `redis://:PASSWORD@redis:6379` (a trailing
/// `/` allowed), the password without `@` or `/`.
pub(super) fn redis_url_password(url: &str) -> Option<&str> {
    let rest = url.strip_prefix("redis://:")?;
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    let password = rest.strip_suffix("@redis:6379")?;
    (!password.contains(['@', '/'])).then_some(password)
}

/// Whether a shell command compares something with the word PONG (`= PONG`, spaces
/// allowed after `=`).
pub(super) fn compares_with_pong(command: &str) -> bool {
    command.match_indices('=').any(|(i, _)| {
        command[i + 1..]
            .trim_start()
            .strip_prefix("PONG")
            .is_some_and(|after| {
                after
                    .chars()
                    .next()
                    .is_none_or(|c| !(c.is_alphanumeric() || c == '_'))
            })
    })
}
