//! A real HTTP server for the download tests: Debian's nginx, started by the test on a free loopback port
//! in a temp folder, serving a folder of files at MAST's `retrieve_product` URL. Its Range, If-Range and
//! ETag handling, and its gzip, are nginx's own, not our reading of the RFCs (the stand-in in `mast.rs`
//! shares that reading, so it cannot catch our mistakes about it).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::wait_until;

/// The running server; stopped when dropped.
pub struct Nginx {
    pub dir: tempfile::TempDir,
    /// `http://127.0.0.1:PORT`.
    pub base_url: String,
    child: Child,
}

fn binary() -> Option<PathBuf> {
    ["/usr/sbin/nginx", "/usr/bin/nginx"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

impl Nginx {
    /// nginx serving `data` (file name = product name), with `extra` directives in its `server` block;
    /// `None` (the test says it is skipped) when nginx is not installed, unless `REQUIRE_NGINX` is set.
    pub fn start(data: &Path, extra: &str) -> Option<Nginx> {
        let Some(nginx) = binary() else {
            assert!(
                std::env::var_os("REQUIRE_NGINX").is_none(),
                "nginx is required here (REQUIRE_NGINX) but not installed (apt-get install nginx)"
            );
            eprintln!("SKIPPED: nginx is not installed (apt-get install nginx)");
            return None;
        };
        let dir = tempfile::tempdir().unwrap();
        let port = super::free_port();
        let d = dir.path().display();
        let conf = format!(
            "daemon off;\nmaster_process off;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
             events {{ worker_connections 64; }}\n\
             http {{\n  log_format bytes '$connection $request_method $request_uri $status $body_bytes_sent';\n  \
             access_log {d}/access.log bytes;\n  client_body_temp_path {d}/tmp;\n  \
             proxy_temp_path {d}/tmp;\n  fastcgi_temp_path {d}/tmp;\n  uwsgi_temp_path {d}/tmp;\n  \
             scgi_temp_path {d}/tmp;\n  types {{ application/fits fits; application/json json; }}\n  \
             server {{\n    listen 127.0.0.1:{port};\n    {extra}\n    \
             location = /search/jwst/api/v0.1/retrieve_product {{ rewrite ^ /files/$arg_product_name last; }}\n    \
             location /files/ {{ alias {}/; }}\n    \
             location = /ready {{ access_log off; return 204; }}\n  }}\n}}\n",
            data.display()
        );
        let path = dir.path().join("nginx.conf");
        std::fs::write(&path, conf).unwrap();
        let child = Command::new(nginx)
            .args(["-c", path.to_str().unwrap(), "-p", &d.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nginx starts");
        // Up means nginx answers HTTP on the port. A bare connect is not enough: a connect to a free
        // loopback port can meet itself (the kernel may pick that very port as the source), so a
        // readiness check by connect alone passes for an nginx that never bound it.
        let up = wait_until(Duration::from_secs(10), || answers_http(port));
        assert!(
            up,
            "nginx did not start: {}",
            std::fs::read_to_string(dir.path().join("error.log")).unwrap_or_default()
        );
        Some(Nginx {
            dir,
            base_url: format!("http://127.0.0.1:{port}"),
            child,
        })
    }

    /// Every request so far: (nginx's serial number of the connection it came on, method), in order.
    pub fn connections_and_methods(&self) -> Vec<(u64, String)> {
        std::fs::read_to_string(self.dir.path().join("access.log"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let mut f = l.split(' ');
                Some((f.next()?.parse().ok()?, f.next()?.to_string()))
            })
            .collect()
    }

    /// Every request so far: (status, body bytes sent), in order.
    pub fn requests(&self) -> Vec<(u16, u64)> {
        std::fs::read_to_string(self.dir.path().join("access.log"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let mut f = l.rsplitn(3, ' ');
                let bytes = f.next()?.parse().ok()?;
                let status = f.next()?.parse().ok()?;
                Some((status, bytes))
            })
            .collect()
    }
}

/// Whether nginx answers on `127.0.0.1:port` (at `/ready`, which it leaves out of its access log).
fn answers_http(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let mut head = [0u8; 5];
    s.write_all(b"GET /ready HTTP/1.0\r\n\r\n").is_ok()
        && s.read_exact(&mut head).is_ok()
        && &head == b"HTTP/"
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
