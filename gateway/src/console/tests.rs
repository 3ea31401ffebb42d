//! The console's configuration checks.

use super::*;

fn parse(yaml: &str) -> ConsoleConfig {
    serde_yaml_ng::from_str(yaml).unwrap()
}

const OIDC: &str = "oidc:\n  issuer: https://idp.example.com\n  client_id: gw\n  client_secret_file: /etc/gw/secret\n  redirect_url: https://gw.example.com:9443/auth/callback\n  roles: {sec: reviewer}\n";

#[test]
fn the_console_is_off_by_default_and_checks_its_settings_when_on() {
    assert_eq!(ConsoleConfig::default().listen, None);
    ConsoleConfig::default().validate().unwrap();
    let ok = parse(&format!("listen: 0.0.0.0:9443\ntls_cert: /etc/gw/c.pem\ntls_key: /etc/gw/k.pem\n{OIDC}"));
    ok.validate().unwrap();
    assert_eq!(ok.oidc.as_ref().unwrap().groups_claim, "groups");

    let field = |yaml: &str| parse(yaml).validate().unwrap_err().0;
    // Off loopback TLS is required.
    assert_eq!(field(&format!("listen: 0.0.0.0:9443\n{OIDC}")), "console.listen");
    assert_eq!(field(&format!("listen: 0.0.0.0:9443\ntls_cert: /c.pem\n{OIDC}")), "console.tls_key");
    // Without OIDC nobody could sign in.
    assert_eq!(field("listen: 127.0.0.1:9443\ntls_cert: /c.pem\ntls_key: /k.pem\n"), "console.oidc");
    // Plain HTTP on loopback: the redirect must then be http.
    assert_eq!(field(&format!("listen: 127.0.0.1:9443\n{OIDC}")), "console.oidc.redirect_url");
    let issuer_http = OIDC.replace("https://idp.example.com", "http://idp.example.com");
    assert_eq!(
        field(&format!("listen: 127.0.0.1:9443\ntls_cert: /c.pem\ntls_key: /k.pem\n{issuer_http}")),
        "console.oidc.issuer"
    );
    let issuer_loopback = OIDC.replace("https://idp.example.com", "http://127.0.0.1:4000");
    parse(&format!("listen: 127.0.0.1:9443\ntls_cert: /c.pem\ntls_key: /k.pem\n{issuer_loopback}")).validate().unwrap();
    let no_roles = OIDC.replace("  roles: {sec: reviewer}\n", "  roles: {}\n");
    assert_eq!(
        field(&format!("listen: 127.0.0.1:9443\ntls_cert: /c.pem\ntls_key: /k.pem\n{no_roles}")),
        "console.oidc.roles"
    );
    // The secret is a file, never inline.
    assert!(serde_yaml_ng::from_str::<ConsoleConfig>(&format!(
        "listen: 127.0.0.1:9443\n{}",
        OIDC.replace("client_secret_file: /etc/gw/secret", "client_secret: hunter2")
    ))
    .is_err());
}
