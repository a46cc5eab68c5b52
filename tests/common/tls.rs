//! A throwaway public-key infrastructure for the TLS tests, made with the `openssl` command:
//! a CA, a server certificate for 127.0.0.1/localhost (the Kafka broker and PostgreSQL share
//! it), a client certificate for mutual TLS (its key plain and encrypted), and an unrelated
//! "untrusted" CA. All keys are P-256 (fast to make) in PKCS#8 PEM, which Kafka's PEM keystore,
//! librdkafka, PostgreSQL and sqlx all read.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// The passphrase of `client-encrypted.key`.
pub const CLIENT_KEY_PASSPHRASE: &str = "client-key-passphrase-7Q";

/// The files of one test PKI, in a temporary directory removed on drop.
pub struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    /// Makes the files (about 0.2 s):
    /// - `ca.pem`, `ca.key`: the trusted CA;
    /// - `server.pem`, `server.key`: signed by it, for IP 127.0.0.1 and DNS localhost;
    /// - `broker-keystore.pem`: `server.key` then `server.pem` (Kafka's PEM keystore);
    /// - `client.pem`, `client.key`, `client-encrypted.key` (passphrase
    ///   [`CLIENT_KEY_PASSPHRASE`]): a client certificate signed by the CA;
    /// - `pg-client.pem`, `pg-client.key`: a client certificate for PostgreSQL user `postgres`;
    /// - `other-ca.pem`: a CA nobody trusts; `other-client.pem`/`.key` signed by it.
    pub fn new() -> Pki {
        let dir = tempfile::Builder::new()
            .prefix("neurostream-pki-")
            .tempdir()
            .expect("a temporary directory");
        // The PostgreSQL server (another user) reads server.key from its own copy, but the
        // directory must be traversable for the broker JVM and the service.
        let pki = Pki { dir };
        pki.ca("ca", "neurostream test CA");
        pki.ca("other-ca", "untrusted test CA");
        pki.leaf(
            "server",
            "ca",
            "localhost",
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n",
        );
        pki.leaf(
            "client",
            "ca",
            "neurostream-client",
            "extendedKeyUsage=clientAuth\n",
        );
        pki.leaf(
            "pg-client",
            "ca",
            "postgres",
            "extendedKeyUsage=clientAuth\n",
        );
        pki.leaf(
            "other-client",
            "other-ca",
            "neurostream-client",
            "extendedKeyUsage=clientAuth\n",
        );
        openssl(
            pki.dir.path(),
            &[
                "pkcs8",
                "-topk8",
                "-in",
                "client.key",
                "-out",
                "client-encrypted.key",
                "-v2",
                "aes-256-cbc",
                "-passout",
                &format!("pass:{CLIENT_KEY_PASSPHRASE}"),
            ],
        );
        let keystore = [
            std::fs::read(pki.path("server.key")).unwrap(),
            std::fs::read(pki.path("server.pem")).unwrap(),
        ]
        .concat();
        std::fs::write(pki.path("broker-keystore.pem"), keystore).unwrap();
        pki
    }

    /// A file of this PKI.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A file's contents.
    pub fn read(&self, name: &str) -> Vec<u8> {
        std::fs::read(self.path(name)).unwrap_or_else(|e| panic!("reading {name}: {e}"))
    }

    fn ca(&self, name: &str, cn: &str) {
        openssl(
            self.dir.path(),
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.pem"),
                "-days",
                "3",
                "-subj",
                &format!("/CN={cn}"),
            ],
        );
    }

    fn leaf(&self, name: &str, ca: &str, cn: &str, extensions: &str) {
        let ext = format!("{name}.ext");
        std::fs::write(
            self.path(&ext),
            format!("basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n{extensions}"),
        )
        .unwrap();
        openssl(
            self.dir.path(),
            &[
                "req",
                "-new",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.csr"),
                "-subj",
                &format!("/CN={cn}"),
            ],
        );
        openssl(
            self.dir.path(),
            &[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                &format!("{ca}.pem"),
                "-CAkey",
                &format!("{ca}.key"),
                "-CAcreateserial",
                "-out",
                &format!("{name}.pem"),
                "-days",
                "3",
                "-extfile",
                &ext,
            ],
        );
    }
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run openssl (apt-get install openssl): {e}"));
    assert!(
        out.status.success(),
        "openssl {} failed:\n{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}
