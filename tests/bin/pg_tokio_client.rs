//! tokio-postgres as a job's database client, for the PostgreSQL
//! end-to-end test (tests/postgres.rs), which runs it in the intercepted
//! cgroup (a test process cannot move only itself there). It runs the same
//! script as the other drivers there, with the same environment (`HOST`,
//! `PORT`, `CA`, `PGPASSWORD`, `KEY_FLAG`, `KEY_BLOCK`, `TABLE`), and prints
//! the same lines (`LOGIN_ONLY`: only the first; `CANCEL`: a long query
//! cancelled through the gateway). tokio-postgres binds parameters and reads results in
//! binary format; TLS is rustls (tokio-postgres-rustls) trusting only the
//! gateway's CA.

use std::{env, sync::Arc};

use anyhow::{Context as _, Result};
use tokio_postgres::{error::SqlState, Client};
use tokio_postgres_rustls::MakeRustlsConnect;

fn var(name: &str) -> Result<String> {
    env::var(name).with_context(|| format!("{name} is not set"))
}

/// "SQLSTATE message" of a database error, or the whole error.
fn sqlstate_and_message(e: &tokio_postgres::Error) -> (String, String) {
    match e.as_db_error() {
        Some(db) => (db.code().code().to_owned(), db.message().to_owned()),
        None => (e.code().map(SqlState::code).unwrap_or("-").to_owned(), e.to_string()),
    }
}

async fn script(client: &Client, tls: MakeRustlsConnect) -> Result<()> {
    let user: String = client.query_one("select current_user::text", &[]).await?.get(0);
    println!("user {user}");
    if env::var_os("LOGIN_ONLY").is_some() {
        return Ok(());
    }
    if env::var_os("CANCEL").is_some() {
        let started = std::time::Instant::now();
        let token = client.cancel_token();
        let cancel = tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            token.cancel_query(tls).await
        });
        let result = client.execute("select pg_sleep(60)", &[]).await;
        cancel.await?.context("cancelling")?;
        let cancelled = result.err().and_then(|e| e.code().cloned()) == Some(SqlState::QUERY_CANCELED);
        println!("cancelled {}", cancelled && started.elapsed() < std::time::Duration::from_secs(20));
        return Ok(());
    }
    let (flag, block, table) = (var("KEY_FLAG")?, var("KEY_BLOCK")?, var("TABLE")?);
    let bound: String = client.query_one("select $1::text", &[&flag]).await?.get(0);
    println!("bound {}", bound == flag);
    match client.query_one("select $1::text", &[&block]).await {
        Ok(_) => println!("NOT REFUSED"),
        Err(e) => {
            let (state, message) = sqlstate_and_message(&e);
            println!("refused {state} {} {}", message.contains("github-pat"), message.contains(&block));
        }
    }
    let after: i32 = client.query_one("select $1::int + 1", &[&41i32]).await?.get(0);
    println!("after {after}");
    client.batch_execute(&format!("create table {table} (a int); insert into {table} values (1), (2)")).await?;
    match client.execute(&format!("delete from {table}"), &[]).await {
        Ok(_) => println!("NOT DENIED"),
        Err(e) => {
            let (state, message) = sqlstate_and_message(&e);
            println!("denied {state} {message}");
        }
    }
    let count: i64 = client.query_one(&format!("select count(*) from {table}"), &[]).await?.get(0);
    println!("count {count}");
    Ok(())
}

// One thread: the connection is made by the main thread, whose name (the
// binary's) the gateway attributes it to.
#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let ca = std::fs::read(var("CA")?).context("reading the CA")?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut ca.as_slice()) {
        roots.add(cert.context("parsing the CA")?)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut config = tokio_postgres::Config::new();
    config
        .host(&var("HOST")?)
        .port(var("PORT")?.parse()?)
        .user("ci")
        .dbname("app")
        .password(var("PGPASSWORD")?)
        .ssl_mode(tokio_postgres::config::SslMode::Require);
    let connector = MakeRustlsConnect::new(tls);
    let (client, connection) = config.connect(connector.clone()).await.context("connecting")?;
    let connection = tokio::spawn(connection);
    script(&client, connector).await?;
    drop(client);
    connection.await?.context("the connection")?;
    Ok(())
}
