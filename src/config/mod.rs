//! Command line and configuration file: what the user typed.
//!
//! [`Config`] is declared once: each field is a flag (with its help text and
//! its default, in clap's attributes) and a key of the TOML file of the same
//! name. The file is read first, then every flag that was typed on the
//! command line replaces the file's value (clap tells typed values from
//! defaults), and the result is deserialized with the same defaults. A
//! [`Config`] is then checked once into the [`Settings`] the program runs
//! with (see [`settings`]); nothing else reads a `Config`.

mod flags;
mod settings;

pub use flags::Config;

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use clap::parser::ValueSource;
use clap::{ArgMatches, CommandFactory, FromArgMatches, Parser, Subcommand};
use serde::{Deserialize, Serialize};

pub use crate::app::LogFormat;
pub use crate::guard::forwarded::ForwardedHeader;
pub use crate::net::Cidr;
pub use crate::pipeline::Padding;
pub use crate::upstream::{Strategy, UpstreamSpec};
pub use settings::Warnings;

/// Default config file, read when it exists and no `--config` is given.
pub const DEFAULT_CONFIG_FILE: &str = "doh-proxy.toml";

/// Command line of `doh-proxy`.
#[derive(Debug, Parser)]
#[command(
    name = "doh-proxy",
    version,
    about = "A DNS-over-HTTPS (RFC 8484) endpoint that rejects malformed requests early, \
             enforces per-client and global budgets, bans abusers for a while and answers \
             from a cache with a TTL floor.",
    after_help = "Every option also has a key of the same name (dashes become underscores) in \
                  the TOML config file; the command line wins over the file.\n\
                  Example: doh-proxy --min-ttl 1800 -u 9.9.9.9:53 --tls-cert chain.pem --tls-key key.pem"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub config: Config,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Validate a configuration (file and flags) and exit: 0 when it is sound,
    /// 1 with a one-line reason otherwise. Nothing is bound or sent.
    Check,
}

/// A size in bytes, written `268435456`, `256MiB`, `1GiB`, `64KiB`, `100MB`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl FromStr for ByteSize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let n: u64 = num
            .parse()
            .map_err(|_| format!("`{s}` is not a size (bytes, or a number with KiB, MiB, GiB)"))?;
        let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kib" => 1 << 10,
            "m" | "mib" => 1 << 20,
            "g" | "gib" => 1 << 30,
            "kb" => 1_000,
            "mb" => 1_000_000,
            "gb" => 1_000_000_000,
            _ => {
                return Err(format!(
                    "`{s}`: unknown unit `{unit}` (use KiB, MiB or GiB)"
                ))
            }
        };
        n.checked_mul(mult)
            .map(ByteSize)
            .ok_or_else(|| format!("`{s}` is too large"))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0;
        for (unit, m) in [("GiB", 1u64 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)] {
            if n >= m && n % m == 0 {
                return write!(f, "{}{unit}", n / m);
            }
        }
        write!(f, "{n}")
    }
}

impl Serialize for ByteSize {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Int(n) => Ok(ByteSize(n)),
            Raw::Text(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

impl Default for Config {
    /// The defaults: an empty command line.
    fn default() -> Self {
        match Cli::try_parse_from(["doh-proxy"]) {
            Ok(cli) => cli.config,
            // Covered by a unit test: the built-in defaults always parse.
            Err(e) => panic!("built-in defaults do not parse: {e}"),
        }
    }
}

/// A configuration that cannot be used, with a one-line reason.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{0}")]
    Invalid(String),
}

/// What the command line said: the subcommand, and the flags that were
/// typed (as TOML values) so that they can be laid over the file again
/// whenever it is re-read.
#[derive(Debug, Clone)]
pub struct CommandLine {
    pub check: bool,
    /// `--config`, if given.
    pub file: Option<PathBuf>,
    typed: toml::Table,
}

impl CommandLine {
    /// Parses the process's arguments (exits with usage on error, as clap does).
    pub fn parse() -> CommandLine {
        Self::from_matches(&Cli::command().get_matches())
    }

    /// Parses `args` (the program name first).
    pub fn try_parse_from<I, T>(args: I) -> Result<CommandLine, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        Ok(Self::from_matches(
            &Cli::command().try_get_matches_from(args)?,
        ))
    }

    fn from_matches(m: &ArgMatches) -> CommandLine {
        let (check, config) = match Cli::from_arg_matches(m) {
            Ok(cli) => (matches!(cli.command, Some(Command::Check)), cli.config),
            Err(e) => e.exit(),
        };
        let mut typed = toml::Table::new();
        if let Ok(toml::Value::Table(all)) = toml::Value::try_from(&config) {
            for (key, value) in all {
                if m.value_source(&key) == Some(ValueSource::CommandLine) {
                    typed.insert(key, value);
                }
            }
        }
        CommandLine {
            check,
            file: config.config,
            typed,
        }
    }

    /// The config file to read: `--config`, else `./doh-proxy.toml` if present.
    pub fn config_file(&self) -> Option<PathBuf> {
        self.file.clone().or_else(|| {
            let p = PathBuf::from(DEFAULT_CONFIG_FILE);
            p.exists().then_some(p)
        })
    }

    /// Reads the file (if any) and lays the typed flags over it.
    pub fn load(&self) -> Result<Config, ConfigError> {
        let path = self.config_file();
        let mut table = match &path {
            Some(p) => read_table(p)?,
            None => toml::Table::new(),
        };
        table.extend(self.typed.clone());
        let origin = path.unwrap_or_else(|| PathBuf::from("<command line>"));
        let mut cfg: Config =
            table
                .try_into()
                .map_err(|e: toml::de::Error| ConfigError::Parse {
                    path: origin,
                    message: e.message().to_string(),
                })?;
        cfg.config = self.file.clone();
        Ok(cfg)
    }
}

impl Config {
    /// Parses a configuration from TOML text alone (used by tests and fuzzing).
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::from("<text>"),
            message: e.message().to_string(),
        })
    }
}

fn read_table(path: &Path) -> Result<toml::Table, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    text.parse::<toml::Table>().map_err(|e| ConfigError::Parse {
        path: path.to_owned(),
        message: e.message().to_string(),
    })
}

/// Reads `nameserver` lines of a resolv.conf, port 53.
pub fn system_nameservers(path: &Path) -> std::io::Result<Vec<SocketAddr>> {
    let text = std::fs::read_to_string(path)?;
    Ok(text
        .lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            (it.next() == Some("nameserver"))
                .then(|| it.next())
                .flatten()
        })
        .filter_map(|a| a.split('%').next()?.parse::<IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 53))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmdline(args: &[&str]) -> CommandLine {
        let mut v = vec!["doh-proxy"];
        v.extend_from_slice(args);
        CommandLine::try_parse_from(v).unwrap()
    }

    fn temp_file(name: &str, text: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("doh-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join(name);
        std::fs::write(&file, text).unwrap();
        file
    }

    #[test]
    fn defaults_match_spec() {
        let c = Config::default();
        assert_eq!(c.listen, vec!["127.0.0.1:8443".parse().unwrap()]);
        assert_eq!(c.path, "/dns-query");
        assert_eq!((c.min_ttl, c.max_ttl, c.cache_size), (0, 86400, 100_000));
        assert_eq!(c.cache_memory, ByteSize(256 << 20));
        assert_eq!((c.err_ttl, c.stale_secs), (2, 86400));
        assert_eq!(
            (c.per_ip_qps, c.per_ip_burst, c.per_prefix_qps),
            (20, 100, 200)
        );
        assert_eq!((c.prefix_v4, c.prefix_v6), (24, 56));
        assert_eq!(
            (c.upstream_qps, c.max_conns_per_ip, c.max_conns),
            (1000, 32, 10000)
        );
        assert_eq!((c.per_ip_conn_rate, c.per_prefix_conn_rate), (10, 100));
        assert_eq!(c.forwarded_header, ForwardedHeader::Xff);
        assert_eq!((c.ban_after, c.ban_secs), (20, 600));
        assert_eq!(c.metrics_listen, "127.0.0.1:9153".parse().unwrap());
        assert_eq!(c.upstream_timeout, 2500);
        assert!(!c.dry_run && c.tls_cert.is_none() && c.upstream.is_empty());
        assert_eq!(c.upstream_strategy, Strategy::Fastest);
        // An empty file means the same defaults.
        let empty = Config::from_toml("").unwrap();
        assert_eq!(format!("{empty:?}"), format!("{c:?}"));
    }

    #[test]
    fn command_line_wins_over_file() {
        let file = temp_file(
            "c.toml",
            "min_ttl = 60\nmax_ttl = 600\nupstream = [\"127.0.0.1:5300\"]\nallow = [\"10.0.0.0/8\"]\ndry_run = true\n",
        );
        let f = file.to_str().unwrap();
        let c = cmdline(&["-c", f, "--min-ttl", "1800", "--max-ttl", "86400"])
            .load()
            .unwrap();
        assert_eq!(c.min_ttl, 1800);
        assert_eq!(c.max_ttl, 86400);
        assert_eq!(c.upstream[0].label(), "127.0.0.1:5300");
        assert_eq!(c.allow[0].to_string(), "10.0.0.0/8");
        assert!(c.dry_run, "a key the command line did not give stays");
        let c = cmdline(&["-c", f, "-u", "127.0.0.2:53"]).load().unwrap();
        assert_eq!(c.upstream[0].label(), "127.0.0.2:53");
        // Flags after the subcommand count too.
        let cl = cmdline(&["check", "-c", f, "--cache-memory", "1GiB"]);
        assert!(cl.check);
        assert_eq!(cl.load().unwrap().cache_memory, ByteSize(1 << 30));
    }

    #[test]
    fn unknown_key_and_bad_values_are_refused() {
        assert!(Config::from_toml("min_tll = 5").is_err());
        assert!(Config::from_toml("upstream = [\"not-an-address\"]").is_err());
        assert!(Config::from_toml("min_ttl = -1").is_err());
        assert!(Config::from_toml("cache_memory = \"12 parsecs\"").is_err());
        assert!(Config::from_toml("forwarded_header = \"via\"").is_err());
        let e = Config::from_toml("upstream = [\"quic://1.1.1.1\"]").unwrap_err();
        assert!(e.to_string().contains("unknown scheme"), "{e}");
        assert_eq!(
            Config::from_toml("cache_memory = 1048576")
                .unwrap()
                .cache_memory,
            ByteSize(1 << 20)
        );
    }

    #[test]
    fn the_example_file_is_exactly_the_defaults() {
        // doh-proxy.toml says it changes nothing until edited: hold it to it.
        let example = include_str!("../../doh-proxy.toml");
        let parsed = Config::from_toml(example).unwrap();
        assert_eq!(format!("{parsed:?}"), format!("{:?}", Config::default()));
        // And it names every key (commented out or not).
        let defaults = toml::Value::try_from(Config::default()).unwrap();
        for key in defaults.as_table().unwrap().keys() {
            assert!(
                example.contains(&format!("\n{key} =")) || example.contains(&format!("# {key} =")),
                "doh-proxy.toml does not mention `{key}`"
            );
        }
        for key in ["upstream", "tls_cert", "tls_key", "ban_file", "admin_token"] {
            assert!(example.contains(&format!("# {key} =")), "{key}");
        }
    }

    #[test]
    fn byte_sizes() {
        assert_eq!("256MiB".parse::<ByteSize>().unwrap(), ByteSize(256 << 20));
        assert_eq!("1GiB".parse::<ByteSize>().unwrap(), ByteSize(1 << 30));
        assert_eq!("100MB".parse::<ByteSize>().unwrap(), ByteSize(100_000_000));
        assert_eq!("4096".parse::<ByteSize>().unwrap(), ByteSize(4096));
        assert!("MiB".parse::<ByteSize>().is_err());
        assert!("99999999999999999999GiB".parse::<ByteSize>().is_err());
        assert_eq!(ByteSize(256 << 20).to_string(), "256MiB");
    }

    #[test]
    fn resolv_conf_nameservers() {
        let p = temp_file(
            "resolv.conf",
            "# c\nnameserver 192.0.2.53\nsearch x\nnameserver fe80::1%eth0\n",
        );
        let v = system_nameservers(&p).unwrap();
        assert_eq!(v[0], "192.0.2.53:53".parse().unwrap());
        assert_eq!(v.len(), 2);
    }
}
