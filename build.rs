//! `sqlx::migrate!` embeds `migrations/sqlite/` and `migrations/postgres/` at compile time; without this,
//! cargo does not know to rebuild when a migration is added or changed, and a build can ship without it.
fn main() {
    println!("cargo:rerun-if-changed=migrations");
    println!("cargo:rerun-if-changed=migrations/sqlite");
    println!("cargo:rerun-if-changed=migrations/postgres");
}
