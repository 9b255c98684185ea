//! The PostgreSQL the shared-store tests run against (`tests/common/postgres.rs`): it starts as an
//! unprivileged user however the tests run, gives each test a database of its own, survives a kill of
//! its server process with what was committed, and goes away with the test process.

mod common;

use std::str::FromStr;
use std::sync::Mutex;

use common::postgres::Postgres;
use mastsub::store::{PgStore, Store, StoreError};

/// The tests that kill the server take turns.
static KILLS: Mutex<()> = Mutex::new(());

#[test]
fn each_test_gets_its_own_database_and_a_killed_server_keeps_what_was_committed() {
    let _turn = KILLS.lock().unwrap_or_else(|e| e.into_inner());
    let Some(pg) = Postgres::shared() else {
        return;
    };
    let a = pg.database("kept");
    let b = pg.database("kept");
    assert_ne!(a, b);
    let name = |url: &str| url.rsplit('/').next().unwrap().to_string();
    pg.psql(
        &name(&a),
        "CREATE TABLE t (n int); INSERT INTO t VALUES (7)",
    )
    .unwrap();
    assert!(
        pg.psql(&name(&b), "SELECT n FROM t").is_err(),
        "the databases are not apart"
    );
    // The server is this binary's own: its data are in the test's folder, owned by the user it runs as
    // (`postgres` when the tests run as root, which PostgreSQL refuses).
    let data = pg
        .psql("postgres", "SELECT current_setting('data_directory')")
        .unwrap();
    assert!(
        data.trim().starts_with(pg.dir().to_str().unwrap()),
        "{data}"
    );
    let owner = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(data.trim()).unwrap());
    if nix::unistd::geteuid().is_root() {
        assert_ne!(owner, 0, "the server's data belong to root");
    }

    pg.kill();
    assert!(pg.psql(&name(&a), "SELECT 1").is_err(), "still answering");
    pg.start_server();
    assert_eq!(
        pg.psql(&name(&a), "SELECT n FROM t").unwrap().trim(),
        "7",
        "{}",
        pg.log()
    );
}

#[test]
fn a_store_whose_server_is_down_answers_errors_and_works_again_once_it_is_back() {
    let _turn = KILLS.lock().unwrap_or_else(|e| e.into_inner());
    let Some(pg) = Postgres::shared() else {
        return;
    };
    let url = pg.database("restart");
    let options = sqlx::postgres::PgConnectOptions::from_str(&url).unwrap();
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(async {
            let store = PgStore::open(options, &url).await.unwrap();
            store.retry(None, 0).await.unwrap();
            pg.kill();
            // Every connection is gone, and no new one can be made: an error (after the pool's wait for
            // a connection), not a panic.
            match store.status(0).await {
                Err(StoreError::Query { path, .. }) => assert_eq!(path, url),
                other => panic!("{other:?}"),
            }
            pg.start_server();
            assert_eq!(store.next_due().await.unwrap(), None);
            store.close().await;
        });
}
