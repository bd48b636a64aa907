//! `sundial-wal`: inspect a log directory, measure the log against the bare disk, and (for the
//! crash test) append until killed.
//!
//! Usage:
//!   sundial-wal inspect DIR
//!   sundial-wal bench [--dir DIR] [--seconds S] [--sync auto|io-uring|syscall] [--cold]
//!   sundial-wal crash-child DIR SEED   (used by wal/tests/crash.rs)

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};
use sundial_wal::{SyncChoice, TypedWal, Wal, WalOptions};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("inspect") if args.len() == 2 => inspect(Path::new(&args[1])),
        Some("bench") => bench(&args[1..]),
        Some("crash-child") if args.len() == 3 => crash_child(Path::new(&args[1]), &args[2]),
        _ => Err("usage: sundial-wal inspect DIR | bench [--dir DIR] [--seconds S] [--sync auto|io-uring|syscall] [--cold] | crash-child DIR SEED".into()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("sundial-wal: {error}");
            ExitCode::FAILURE
        }
    }
}

type CliResult = Result<(), Box<dyn std::error::Error>>;

/// Opens (and so recovers) a log and prints what it holds.
fn inspect(dir: &Path) -> CliResult {
    let (wal, report) = Wal::open(dir, WalOptions::default())?;
    println!("directory        {}", dir.display());
    println!("backend          {:?}", wal.backend());
    println!("first index      {}", wal.first_index());
    println!("last index       {}", wal.last_index());
    println!("segments         {}", report.segments);
    println!("torn tail cut    {} bytes", report.torn_tail_bytes);
    println!("leftovers        {} files removed", report.leftover_files_removed);
    println!("hard state       {}", wal.hard_state().map_or("none".into(), |h| format!("{} bytes", h.len())));
    Ok(())
}

// ---- crash child -------------------------------------------------------------------------

/// The body the crash child writes at `index`; wal/tests/crash.rs recomputes it.
fn crash_body(index: u64) -> Vec<u8> {
    let len = (index.wrapping_mul(37) % 700) as usize + 1;
    (0..len).map(|i| (index as usize).wrapping_mul(131).wrapping_add(i) as u8).collect()
}

/// Appends batches forever (until killed), printing `D <index>` after each durable commit and
/// `P <upto>` / `S <from>` before each prefix / suffix truncation it starts.
fn crash_child(dir: &Path, seed: &str) -> CliResult {
    let mut rng = seed.parse::<u64>()? | 1;
    let options = WalOptions { segment_size_bytes: 256 << 10, sync: SyncChoice::Auto };
    let (mut wal, _) = Wal::open(dir, options)?;
    let mut out = std::io::stdout().lock();
    // Runs until the parent kills it; the bound only stops a forgotten child.
    for _round in 0..1_000_000u32 {
        let roll = next(&mut rng);
        if roll % 50 == 0 && wal.last_index() > 2000 {
            let upto = wal.last_index() - 1000;
            writeln!(out, "P {upto}")?;
            out.flush()?;
            wal.truncate_prefix(upto)?;
        } else if roll % 50 == 1 && wal.last_index() > wal.first_index() {
            // Mostly short (a Raft conflict), sometimes across several 256 KiB segments.
            let span = if roll % 200 == 1 { 1500 } else { 10 };
            let depth = (next(&mut rng) % span).min(wal.last_index() - wal.first_index());
            let from = wal.last_index() - depth;
            writeln!(out, "S {from}")?;
            out.flush()?;
            wal.truncate_suffix(from)?;
        }
        let count = 1 + next(&mut rng) % 64;
        for _ in 0..count {
            let index = wal.last_index() + wal.staged_count() + 1;
            wal.append(index, &crash_body(index))?;
        }
        let durable = wal.commit()?;
        writeln!(out, "D {durable}")?;
        out.flush()?;
    }
    Ok(())
}

fn next(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

// ---- benchmark ---------------------------------------------------------------------------

const RECORD_SIZES: [usize; 2] = [64, 1024];
const BATCH_SIZES: [usize; 4] = [1, 16, 256, 4096];

struct BenchArgs {
    dir: PathBuf,
    per_cell: Duration,
    sync: SyncChoice,
    warm: bool,
}

fn parse_bench_args(args: &[String]) -> Result<BenchArgs, Box<dyn std::error::Error>> {
    let mut parsed =
        BenchArgs { dir: std::env::temp_dir(), per_cell: Duration::from_secs(2), sync: SyncChoice::Auto, warm: true };
    let mut rest = args.iter();
    while let Some(flag) = rest.next() {
        if flag == "--cold" {
            parsed.warm = false;
            continue;
        }
        let value = rest.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--dir" => parsed.dir = PathBuf::from(value),
            "--seconds" => {
                let seconds: f64 = value.parse().map_err(|_| "--seconds: must be a number")?;
                if !(0.1..=600.0).contains(&seconds) {
                    return Err("--seconds: must be within 0.1..=600".into());
                }
                parsed.per_cell = Duration::from_secs_f64(seconds);
            }
            "--sync" => {
                parsed.sync = match value.as_str() {
                    "auto" => SyncChoice::Auto,
                    "io-uring" => SyncChoice::IoUring,
                    "syscall" => SyncChoice::Syscall,
                    _ => return Err("--sync: must be auto, io-uring or syscall".into()),
                }
            }
            _ => return Err(format!("unknown flag {flag}").into()),
        }
    }
    Ok(parsed)
}

/// Rounds per cell: the log and both references take turns, and each reports its median, so
/// a drift of this machine's shared disk hits all three alike.
const ROUNDS: u32 = 3;

/// Throughput of the log beside two bare write + fdatasync loops with the same batch sizes:
/// one writing only the payload bytes, one writing as many bytes as the log does (payload plus
/// record headers and padding). Then the cost of reading one record in place.
fn bench(args: &[String]) -> CliResult {
    let args = parse_bench_args(args)?;
    let scratch = tempfile_in(&args.dir)?;
    let round = args.per_cell / ROUNDS;
    let mut disk = BareDisk::create(&scratch.join("bare"))?;
    println!("| record B | batch | log rec/s | log MB/s | disk rec/s (payload) | log/disk | disk rec/s (framed) | log/disk framed |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
    for record in RECORD_SIZES {
        for batch in BATCH_SIZES {
            let mut log = LogBench::open(&scratch.join("log"), &args, record)?;
            let (mut payload, mut framed, mut logged) = (Vec::new(), Vec::new(), Vec::new());
            for _ in 0..ROUNDS {
                payload.push(disk.run(record, batch, round)?);
                framed.push(disk.run(sundial_wal::format::record_size(record), batch, round)?);
                logged.push(log.run(batch, round)?);
            }
            log.close()?;
            let (payload, framed, logged) = (median(payload), median(framed), median(logged));
            println!(
                "| {record} | {batch} | {logged:.0} | {:.1} | {payload:.0} | {:.2} | {framed:.0} | {:.2} |",
                logged * record as f64 / 1e6,
                logged / payload,
                logged / framed
            );
        }
    }
    disk.remove()?;
    read_costs(&scratch.join("read"))?;
    std::fs::remove_dir_all(&scratch)?;
    Ok(())
}

fn median(mut samples: Vec<f64>) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

fn tempfile_in(dir: &Path) -> Result<PathBuf, Box<dyn std::error::Error>> {
    let path = dir.join(format!("sundial-wal-bench-{}", std::process::id()));
    std::fs::create_dir_all(&path)?;
    Ok(path)
}

/// A log under load. It is truncated as a Raft node would after snapshots (keeping about one
/// segment of records), so retired segments are recycled. With warm-up, 5 segments are written
/// first so the timed part runs on recycled segments (the steady state); with `--cold` it
/// starts on freshly preallocated ones.
struct LogBench {
    wal: Wal,
    dir: PathBuf,
    body: Vec<u8>,
    keep_records: u64,
}

impl LogBench {
    fn open(dir: &Path, args: &BenchArgs, record: usize) -> Result<LogBench, Box<dyn std::error::Error>> {
        let _ = std::fs::remove_dir_all(dir);
        let options = WalOptions { sync: args.sync, ..WalOptions::default() };
        let (wal, _) = Wal::open(dir, options)?;
        let keep_records = options.segment_size_bytes / sundial_wal::format::record_size(record) as u64;
        let mut bench = LogBench { wal, dir: dir.to_path_buf(), body: vec![0x5a; record], keep_records };
        if args.warm {
            // Bounded: 5 segments' worth of records.
            for _ in 0..(5 * keep_records).div_ceil(4096) {
                bench.append_batch(4096)?;
            }
        }
        Ok(bench)
    }

    fn append_batch(&mut self, count: usize) -> Result<(), sundial_wal::WalError> {
        for _ in 0..count {
            self.wal.append(7, &self.body)?;
        }
        self.wal.commit()?;
        if self.wal.last_index() + 1 - self.wal.first_index() > 2 * self.keep_records {
            self.wal.truncate_prefix(self.wal.last_index() - self.keep_records)?;
        }
        Ok(())
    }

    /// Records/s of `append` × `batch` + `commit` for `budget`.
    fn run(&mut self, batch: usize, budget: Duration) -> Result<f64, Box<dyn std::error::Error>> {
        let started = Instant::now();
        let mut records = 0u64;
        while started.elapsed() < budget {
            self.append_batch(batch)?;
            records += batch as u64;
        }
        Ok(records as f64 / started.elapsed().as_secs_f64())
    }

    fn close(self) -> CliResult {
        drop(self.wal);
        std::fs::remove_dir_all(&self.dir)?;
        Ok(())
    }
}

/// The reference: `pwrite` of `batch × record` bytes then `fdatasync`, into a file written
/// in full beforehand (so no block allocation) and overwritten in a cycle. It is as large as
/// the log's working set (5 segments of 64 MiB), so neither side rewrites recently written
/// blocks more often than the other; the same file serves every measurement of a run.
struct BareDisk {
    file: std::fs::File,
    path: PathBuf,
    offset: u64,
}

const BARE_DISK_BYTES: u64 = 320 << 20;

impl BareDisk {
    fn create(path: &Path) -> Result<BareDisk, Box<dyn std::error::Error>> {
        let file = OpenOptions::new().create(true).truncate(true).read(true).write(true).open(path)?;
        let zeros = vec![0u8; 1 << 20];
        // Bounded: BARE_DISK_BYTES / 1 MiB writes.
        for chunk in 0..BARE_DISK_BYTES >> 20 {
            file.write_all_at(&zeros, chunk << 20)?;
        }
        file.sync_all()?;
        Ok(BareDisk { file, path: path.to_path_buf(), offset: 0 })
    }

    /// Records/s of one write + fdatasync per batch, for `budget`.
    fn run(&mut self, record: usize, batch: usize, budget: Duration) -> Result<f64, Box<dyn std::error::Error>> {
        let bytes = vec![0x5au8; record * batch];
        let started = Instant::now();
        let mut records = 0u64;
        while started.elapsed() < budget {
            if self.offset + bytes.len() as u64 > BARE_DISK_BYTES {
                self.offset = 0;
            }
            self.file.write_all_at(&bytes, self.offset)?;
            self.file.sync_data()?;
            self.offset += bytes.len() as u64;
            records += batch as u64;
        }
        Ok(records as f64 / started.elapsed().as_secs_f64())
    }

    fn remove(self) -> CliResult {
        drop(self.file);
        std::fs::remove_file(&self.path)?;
        Ok(())
    }
}

#[derive(rkyv::Archive, rkyv::Serialize)]
struct BenchJob {
    id: u64,
    due_ms: i64,
    url: String,
    payload: Vec<u8>,
}

/// Nanoseconds to read one record in place: raw bytes, and an archived value (no validation,
/// it was validated at open), over 100k records read in a scattered order.
fn read_costs(dir: &Path) -> CliResult {
    const RECORDS: u64 = 100_000;
    const READS: u64 = 2_000_000;
    let (mut wal, _) = TypedWal::<BenchJob>::open(dir, WalOptions::default())?;
    for id in 1..=RECORDS {
        let job =
            BenchJob { id, due_ms: id as i64, url: format!("http://127.0.0.1:8080/hook/{id}"), payload: vec![1; 200] };
        wal.append(0, &job)?;
    }
    wal.commit()?;
    let scattered = |i: u64| 1 + (i.wrapping_mul(2_654_435_761) % RECORDS);
    let started = Instant::now();
    let mut sum = 0u64;
    for i in 0..READS {
        sum = sum.wrapping_add(wal.wal().get(scattered(i)).map_or(0, |e| e.body.len() as u64));
    }
    let raw_ns = started.elapsed().as_nanos() as f64 / READS as f64;
    let started = Instant::now();
    for i in 0..READS {
        sum = sum.wrapping_add(wal.get(scattered(i)).map_or(0, |(_, job)| job.due_ms.to_native() as u64));
    }
    let typed_ns = started.elapsed().as_nanos() as f64 / READS as f64;
    let started = Instant::now();
    for i in 0..READS {
        sum = sum.wrapping_add(wal.get(1 + i % 64).map_or(0, |(_, job)| job.due_ms.to_native() as u64));
    }
    let hot_ns = started.elapsed().as_nanos() as f64 / READS as f64;
    println!();
    println!("read one record in place (100k records of ~300 B, scattered order, checksum {sum}):");
    println!("  Wal::get (bytes)            {raw_ns:.1} ns");
    println!("  TypedWal::get (&Archived)   {typed_ns:.1} ns");
    println!("  TypedWal::get, 64 hot records (in cache)   {hot_ns:.1} ns");
    drop(wal);
    std::fs::remove_dir_all(dir)?;
    Ok(())
}
