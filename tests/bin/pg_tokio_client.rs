//! tokio-postgres as a job's database client, for the PostgreSQL
//! end-to-end test (tests/postgres.rs), which runs it in the intercepted
//! cgroup (a test process cannot move only itself there). It runs the same
//! script as the other drivers there, with the same environment (`HOST`,
//! `PORT`, `CA`, `PGPASSWORD`, `KEY_FLAG`, `KEY_BLOCK`, `TABLE`), and prints
//! the same lines (`LOGIN_ONLY`: only the first; `CANCEL`: a long query
//! cancelled through the gateway; `APPROVE`: executions held for approval,
//! see [`approved`]; `COPY`: rows copied in, see [`copied`]; `MASK`: reads
//! masked tables, see [`masked`]). tokio-postgres binds parameters and reads results in
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
    if env::var_os("MASK").is_some() {
        return masked(client).await;
    }
    if env::var_os("APPROVE").is_some() {
        return approved(client).await;
    }
    if env::var_os("COPY").is_some() {
        return copied(client).await;
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

/// `APPROVE`: one prepared UPDATE executed twice, each execution held for
/// approval (the test approves the first and denies the second), then a
/// query showing the session goes on.
async fn approved(client: &Client) -> Result<()> {
    let (flag, table) = (var("KEY_FLAG")?, var("TABLE")?);
    let statement = client.prepare(&format!("update {table} set a = a + 10 where a > $1 and $2::text <> ''")).await?;
    println!("approved {}", client.execute(&statement, &[&0i32, &flag]).await?);
    match client.execute(&statement, &[&100i32, &flag]).await {
        Ok(_) => println!("NOT HELD"),
        Err(e) => {
            let (state, message) = sqlstate_and_message(&e);
            println!("rejected {state} {}", message.to_lowercase().contains("approval"));
        }
    }
    let after: i64 = client.query_one(&format!("select count(*) from {table} where a > 10"), &[]).await?.get(0);
    println!("after {after}");
    Ok(())
}

/// `COPY`: two clean rows copied in (text format), then a row carrying
/// `KEY_BLOCK`, which the gateway refuses, then the count.
async fn copied(client: &Client) -> Result<()> {
    use futures_util::SinkExt as _;
    let (block, table) = (var("KEY_BLOCK")?, format!("{}_copy", var("TABLE")?));
    client.batch_execute(&format!("create table {table} (v text)")).await?;
    let copy = |rows: String| {
        let statement = format!("copy {table} from stdin");
        async move {
            let sink = client.copy_in::<_, bytes::Bytes>(&statement).await?;
            let mut sink = std::pin::pin!(sink);
            sink.send(bytes::Bytes::from(rows)).await?;
            sink.as_mut().finish().await
        }
    };
    copy("clean one\nclean two\n".into()).await?;
    let counted = format!("select count(*) from {table}");
    let count = || client.query_one(&counted, &[]);
    println!("copied {}", count().await?.get::<_, i64>(0));
    match copy(format!("deploy {block}\n")).await {
        Ok(_) => println!("NOT REFUSED"),
        Err(e) => {
            let (state, message) = sqlstate_and_message(&e);
            println!("copy refused {state} {}", message.contains("CI gateway"));
        }
    }
    println!("count {}", count().await?.get::<_, i64>(0));
    Ok(())
}

/// `MASK`: reads the `people` table (binary results) and the 100k rows of
/// `big` (streamed, not collected) and prints what arrived, never the
/// planted key (`KEY`): `LEAKED` in its place, should it arrive.
async fn masked(client: &Client) -> Result<()> {
    let key = var("KEY")?;
    let show = |v: Option<String>| match v {
        Some(v) if v.contains(&key) => "LEAKED".to_owned(),
        Some(v) => v,
        None => "NULL".to_owned(),
    };
    let rows =
        client.query("select id, name, ssn, api_token, pin, score, note, tags from people order by id", &[]).await?;
    for row in &rows {
        let id: i32 = row.try_get(0)?;
        let pin: Option<i32> = row.try_get(4)?;
        let tags: Option<Vec<String>> = row.try_get(7)?;
        println!(
            "people {id} {} {} {} {} {} {} {}",
            show(row.try_get(1)?),
            show(row.try_get(2)?),
            show(row.try_get(3)?),
            pin.map_or("NULL".to_owned(), |p| p.to_string()),
            row.try_get::<_, i32>(5)?,
            show(row.try_get(6)?),
            show(tags.map(|t| t.join(","))),
        );
    }
    // Prepared once, executed twice with a row limit per Execute (a portal).
    let statement = client.prepare("select id, ssn from people where id = $1").await?;
    for id in [1i32, 3] {
        let row = client.query_one(&statement, &[&id]).await?;
        println!("prepared {id} {}", show(row.try_get(1)?));
    }
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 0] = [];
    let stream = client.query_raw("select id, secret, pad from big order by id", params).await?;
    let mut stream = std::pin::pin!(stream);
    let (mut rows, mut masked) = (0u64, 0u64);
    while let Some(row) = futures_util::TryStreamExt::try_next(&mut stream).await? {
        rows += 1;
        if row.try_get::<_, String>(1)? == "[MASKED:column]" {
            masked += 1;
        }
    }
    println!("big {rows} {masked}");
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
