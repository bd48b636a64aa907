//! Network partitions on loopback with nftables: one table per run (`sundial_jepsen_<pid>`)
//! whose input chain drops packets between chosen node addresses. The table is deleted when
//! the `Firewall` is dropped, so a failed or interrupted run leaves no rule behind;
//! `sundial-jepsen clean` removes the tables of runs that were killed outright.

use std::io::Write;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

pub const TABLE_PREFIX: &str = "sundial_jepsen_";
const INSTALL: &str = "install it with `apt-get install -y nftables` (partitions need root or CAP_NET_ADMIN)";

pub struct Firewall {
    table: String,
}

fn nft(script: &str) -> Result<(), String> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("nft: {e}; {INSTALL}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(script.as_bytes()).map_err(|e| format!("nft: {e}"))?;
    }
    let output = child.wait_with_output().map_err(|e| format!("nft: {e}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!("nft: {}; {INSTALL}", String::from_utf8_lossy(&output.stderr).trim()))
    }
}

/// The rules that drop packets from each `(from, to)` pair.
pub fn rules(table: &str, blocked: &[(Ipv4Addr, Ipv4Addr)]) -> String {
    let mut script = format!("flush chain inet {table} input\n");
    for (from, to) in blocked {
        script.push_str(&format!("add rule inet {table} input ip saddr {from} ip daddr {to} drop\n"));
    }
    script
}

impl Firewall {
    /// Creates this run's table (empty: nothing is blocked yet).
    pub fn new() -> Result<Firewall, String> {
        // Rules of a harness killed outright would partition this run's nodes too.
        clean_dead()?;
        let table = format!("{TABLE_PREFIX}{}", std::process::id());
        nft(&format!(
            "table inet {table} {{\n  chain input {{ type filter hook input priority -10; policy accept; }}\n}}\n"
        ))?;
        Ok(Firewall { table })
    }

    /// Replaces whatever is blocked by `blocked`.
    pub fn block(&self, blocked: &[(Ipv4Addr, Ipv4Addr)]) -> Result<(), String> {
        nft(&rules(&self.table, blocked))
    }

    pub fn heal(&self) -> Result<(), String> {
        nft(&rules(&self.table, &[]))
    }
}

impl Drop for Firewall {
    fn drop(&mut self) {
        if let Err(e) = nft(&format!("delete table inet {}\n", self.table)) {
            eprintln!("sundial-jepsen: could not remove the partition rules (table inet {}): {e}", self.table);
        }
    }
}

/// Deletes the tables of harness processes that are gone.
fn clean_dead() -> Result<Vec<String>, String> {
    clean_where(|pid| !std::path::Path::new(&format!("/proc/{pid}")).exists())
}

/// Deletes every `sundial_jepsen_*` table (left by runs that were killed); returns their names.
pub fn clean() -> Result<Vec<String>, String> {
    clean_where(|_| true)
}

fn clean_where(remove: impl Fn(&str) -> bool) -> Result<Vec<String>, String> {
    let output = Command::new("nft").args(["list", "tables"]).output().map_err(|e| format!("nft: {e}; {INSTALL}"))?;
    let listing = String::from_utf8_lossy(&output.stdout);
    let tables: Vec<String> = listing
        .lines()
        .filter_map(|line| line.strip_prefix("table inet "))
        .filter(|name| name.strip_prefix(TABLE_PREFIX).is_some_and(&remove))
        .map(str::to_string)
        .collect();
    for table in &tables {
        nft(&format!("delete table inet {table}\n"))?;
    }
    Ok(tables)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_drop_exactly_the_listed_directions() {
        let a = Ipv4Addr::new(127, 0, 0, 11);
        let b = Ipv4Addr::new(127, 0, 0, 12);
        let script = rules("t", &[(a, b)]);
        assert_eq!(
            script,
            "flush chain inet t input\nadd rule inet t input ip saddr 127.0.0.11 ip daddr 127.0.0.12 drop\n"
        );
        assert_eq!(rules("t", &[]), "flush chain inet t input\n");
    }
}
