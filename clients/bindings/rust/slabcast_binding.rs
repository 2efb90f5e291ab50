//! libslabcast from Rust with the standard library only: `extern "C"` declarations, no crates.
//!
//! Build against an installed libslabcast (clients/bindings/README.md), with the flags pkg-config gives:
//!
//!     export PKG_CONFIG_PATH=<prefix>/lib/pkgconfig
//!     rustc --edition 2021 -O slabcast_binding.rs -o slabcast-rs \
//!         -L native=$(pkg-config --variable=libdir slabcast) \
//!         -C link-arg=-Wl,-rpath,$(pkg-config --variable=libdir slabcast)
//!
//! Three modes, the output of slabcast-sub and slabcast-pub (tests/integration/test_bindings.py reads them):
//!
//!     slabcast-rs --mode version
//!     slabcast-rs --mode sub --address ADDR --stream NAME --size N [--clip]
//!     slabcast-rs --mode pub --framed --address ADDR --stream NAME [--dtype D] [--channels C] [--rate R]
//!                 [--slab-bytes B] [--nslabs K] [--timeout-ms MS] [--timestamps] [--loan]
//!                 [--channel-names a,b] [--channel-types t,t] [--channel-units u,u] [--source-id S]
//!
//! `sub` prints `ready`, then one line per chunk (`seq=… index=… n=… t0=%.9f crc=<crc32 of the bytes>`) and
//! exits 0 when the publisher closes the stream.  `pub` prints `ready`, then reads framed records from stdin as
//! `slabcast-pub --framed` does (little-endian u32 n, u32 flags (bit 0: a discontinuity before the frame; bit 8:
//! n f64 times follow), f64 t0, the times, n samples) and writes each with sc_pub_write, or with `--loan` in
//! place (sc_pub_loan, sc_pub_loan_times, copy, sc_pub_commit); at the end of stdin it closes the stream and
//! prints the publisher's counters (`done frames=… samples=… notices=… published=… slabs=… wakes=…`).  A thread
//! calls sc_pub_service every 10 ms, as slabcast.h asks of a publisher that may wait (here, for stdin) longer
//! than 20 ms between writes.
//!
//! Only edition-2021 features Rust 1.63 has (Debian 12's rustc), so the distribution's compiler builds it too.

use std::env;
use std::ffi::{CStr, CString};
use std::io::{self, Read, Write};
use std::mem::size_of;
use std::os::raw::{c_char, c_int, c_uint, c_void};
use std::process::exit;
use std::ptr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

// ------------------------------------------------------------------------------------------ the C API

/// The ABI this program was written against: the N of libslabcast.so.N (SC_ABI_VERSION).
const ABI_VERSION: c_int = 1;

const SC_OK: c_int = 0;
const SC_EOF: c_int = -1;

/// Opaque handles (sc_client, sc_pub): never built or read on this side.
#[repr(C)]
struct Client {
    _opaque: [u8; 0],
}
#[repr(C)]
struct Pub {
    _opaque: [u8; 0],
}

/// The prefix of sc_sub_options this program uses (32 bytes: struct_size .. clip).  The library reads only
/// struct_size bytes and gives every later field (policy, max_inflight, wake, ...) its default.
#[repr(C)]
struct SubOptions {
    struct_size: usize,
    size: u64,
    seconds: f64,
    clip: c_int,
}

/// The prefix of sc_chunk up to `reserved` (80 bytes, sc_chunk of libslabcast 1.2); the library fills exactly
/// that much (and says so in struct_size), never the `times` pointer 1.3 appended.
#[repr(C)]
struct Chunk {
    struct_size: usize,
    data: *const u8,
    n: u64,
    nbytes: usize,
    dtype: *const c_char,
    channels: c_uint,
    t0: f64,
    seq: u64,
    index: u64,
    flags: c_uint,
    reserved: c_uint,
}

/// The prefix of sc_pub_options up to source_id (96 bytes); `label` (after it) keeps its default.
#[repr(C)]
struct PubOptions {
    struct_size: usize,
    dtype: *const c_char,
    channels: c_uint,
    nslabs: c_uint,
    rate: f64,
    slab_bytes: u64,
    max_chunk_bytes: u64,
    timeout_ms: c_int,
    timestamps: c_int,
    statistics: f64,
    channel_names: *const *const c_char,
    channel_types: *const *const c_char,
    channel_units: *const *const c_char,
    source_id: *const c_char,
}

/// The prefix of sc_pub_info (owned by the library: read no field past its struct_size).
#[repr(C)]
struct PubInfo {
    struct_size: usize,
    name: *const c_char,
    dtype: *const c_char,
    itemsize: c_uint,
    channels: c_uint,
    sample_bytes: usize,
    rate: f64,
    slab_bytes: u64,
    reserve: u64,
    max_frame: u64,
}

/// sc_pub_stats (written by the library: it fills at most the size it is given, and says how much it filled).
#[repr(C)]
#[derive(Default)]
struct PubStats {
    struct_size: usize,
    frames: u64,
    samples: u64,
    notices: u64,
    published: u64,
    slabs: u64,
    wakes: u64,
}

#[link(name = "slabcast")]
extern "C" {
    fn sc_library_version(major: *mut c_int, minor: *mut c_int, patch: *mut c_int) -> *const c_char;
    fn sc_abi_version() -> c_int;
    fn sc_strerror(code: c_int) -> *const c_char;

    fn sc_new() -> *mut Client;
    fn sc_connect(c: *mut Client, address: *const c_char) -> c_int;
    fn sc_sub_options_init_sized(opts: *mut SubOptions, struct_size: usize);
    fn sc_subscribe(c: *mut Client, stream: *const c_char, opts: *const SubOptions) -> c_int;
    fn sc_recv_sized(c: *mut Client, chunk: *mut Chunk, chunk_size: usize, timeout_ms: c_int) -> c_int;
    fn sc_release(c: *mut Client, chunk: *const Chunk) -> c_int;
    fn sc_errmsg(c: *const Client) -> *const c_char;
    fn sc_close(c: *mut Client);

    fn sc_pub_options_init_sized(opts: *mut PubOptions, struct_size: usize);
    fn sc_pub_open(address: *const c_char, stream: *const c_char, opts: *const PubOptions, out: *mut *mut Pub)
        -> c_int;
    fn sc_pub_write(p: *mut Pub, data: *const c_void, n: u64, t0: f64, flags: c_uint, times: *const f64) -> c_int;
    fn sc_pub_loan(p: *mut Pub, n: u64, data: *mut *mut c_void) -> c_int;
    fn sc_pub_loan_times(p: *mut Pub, times: *mut *mut f64) -> c_int;
    fn sc_pub_commit(p: *mut Pub, n: u64, t0: f64, flags: c_uint) -> c_int;
    fn sc_pub_service(p: *mut Pub) -> c_int;
    fn sc_pub_get_info(p: *const Pub) -> *const PubInfo;
    fn sc_pub_get_stats_sized(p: *const Pub, out: *mut PubStats, out_size: usize);
    fn sc_pub_close(p: *mut Pub) -> c_int;
    fn sc_pub_errmsg(p: *const Pub) -> *const c_char;
}

fn text(s: *const c_char) -> String {
    if s.is_null() {
        return String::new();
    }
    unsafe { CStr::from_ptr(s) }.to_string_lossy().into_owned()
}

fn cstring(s: &str) -> CString {
    CString::new(s).unwrap_or_else(|_| fail(2, &format!("argument {:?} holds a NUL byte", s)))
}

fn fail(status: i32, message: &str) -> ! {
    eprintln!("slabcast-rs: {}", message);
    exit(status)
}

// ------------------------------------------------------------------------------------------ arguments

/// Options without a value.
const SWITCHES: [&str; 4] = ["clip", "framed", "loan", "timestamps"];

struct Args {
    pairs: Vec<(String, String)>,
    switches: Vec<String>,
}

impl Args {
    fn parse() -> Args {
        let mut pairs = Vec::new();
        let mut switches = Vec::new();
        let mut it = env::args().skip(1);
        while let Some(a) = it.next() {
            if a.starts_with("--") && SWITCHES.contains(&&a[2..]) {
                switches.push(a[2..].to_string());
            } else if a.starts_with("--") {
                let v = it.next().unwrap_or_else(|| fail(2, &format!("{} needs a value", a)));
                pairs.push((a[2..].to_string(), v));
            } else {
                fail(2, &format!("unexpected argument {:?}", a));
            }
        }
        Args { pairs, switches }
    }

    fn switch(&self, key: &str) -> bool {
        self.switches.iter().any(|s| s == key)
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.pairs.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    fn need(&self, key: &str) -> &str {
        self.get(key).unwrap_or_else(|| fail(2, &format!("--{} is required", key)))
    }

    fn number<T: std::str::FromStr>(&self, key: &str, default: T) -> T {
        match self.get(key) {
            None => default,
            Some(v) => v.parse().unwrap_or_else(|_| fail(2, &format!("--{} {:?} is not a number", key, v))),
        }
    }
}

/// A comma-separated list as the C strings and the array of pointers sc_pub_options takes (both kept alive).
struct CList {
    _strings: Vec<CString>,
    pointers: Vec<*const c_char>,
}

impl CList {
    fn new(list: Option<&str>) -> Option<CList> {
        let strings: Vec<CString> = list?.split(',').map(cstring).collect();
        let pointers = strings.iter().map(|s| s.as_ptr()).collect();
        Some(CList { _strings: strings, pointers })
    }
}

fn list_ptr(list: &Option<CList>) -> *const *const c_char {
    list.as_ref().map_or(ptr::null(), |l| l.pointers.as_ptr())
}

// ------------------------------------------------------------------------------------------ subscribe

fn crc32(bytes: &[u8]) -> u32 {
    let mut c = 0xFFFF_FFFFu32;
    for &b in bytes {
        c ^= b as u32;
        for _ in 0..8 {
            c = (c >> 1) ^ (0xEDB8_8320 & (c & 1).wrapping_neg());
        }
    }
    !c
}

fn subscribe(args: &Args) -> i32 {
    let address = cstring(args.need("address"));
    let stream = cstring(args.need("stream"));
    let mut opts = SubOptions { struct_size: 0, size: 0, seconds: 0.0, clip: 0 };
    unsafe { sc_sub_options_init_sized(&mut opts, size_of::<SubOptions>()) };
    opts.size = args.number("size", 0u64);
    opts.clip = args.switch("clip") as c_int;

    let c = unsafe { sc_new() };
    if c.is_null() {
        fail(1, "sc_new: out of memory");
    }
    let mut rc = unsafe { sc_connect(c, address.as_ptr()) };
    if rc == SC_OK {
        rc = unsafe { sc_subscribe(c, stream.as_ptr(), &opts) };
    }
    if rc != SC_OK {
        eprintln!("slabcast-rs: {} ({})", text(unsafe { sc_errmsg(c) }), text(unsafe { sc_strerror(rc) }));
        unsafe { sc_close(c) };
        return 1;
    }
    let out = io::stdout();
    let mut out = out.lock();
    let _ = writeln!(out, "ready");
    let _ = out.flush();
    let mut ch = Chunk {
        struct_size: 0,
        data: ptr::null(),
        n: 0,
        nbytes: 0,
        dtype: ptr::null(),
        channels: 0,
        t0: 0.0,
        seq: 0,
        index: 0,
        flags: 0,
        reserved: 0,
    };
    loop {
        rc = unsafe { sc_recv_sized(c, &mut ch, size_of::<Chunk>(), 10_000) };
        if rc != SC_OK {
            break;
        }
        if ch.struct_size != size_of::<Chunk>() {
            eprintln!("slabcast-rs: sc_recv_sized filled {} bytes of {}", ch.struct_size, size_of::<Chunk>());
            unsafe { sc_close(c) };
            return 1;
        }
        // The bytes are the stream's shared memory, read-only and unchanged until sc_release.
        let bytes = unsafe { std::slice::from_raw_parts(ch.data, ch.nbytes) };
        let _ = writeln!(out, "seq={} index={} n={} t0={:.9} crc={:08x}", ch.seq, ch.index, ch.n, ch.t0, crc32(bytes));
        let _ = out.flush();
        rc = unsafe { sc_release(c, &ch) };
        if rc != SC_OK {
            break;
        }
    }
    let status = if rc == SC_EOF {
        0
    } else {
        eprintln!("slabcast-rs: {} ({})", text(unsafe { sc_errmsg(c) }), text(unsafe { sc_strerror(rc) }));
        1
    };
    unsafe { sc_close(c) };
    status
}

// ------------------------------------------------------------------------------------------ publish

/// The publisher handle, handed to the service thread: slabcast.h allows sc_pub_service on another thread at
/// the same time as any call but sc_pub_close (which comes only after that thread is joined).
struct Shared(*mut Pub);
unsafe impl Send for Shared {}

/// Fill `buf` from stdin; false at a clean end of input before the first byte, an error if cut short.
fn read_record_part(input: &mut impl Read, buf: &mut [u8], what: &str) -> bool {
    let mut got = 0;
    while got < buf.len() {
        match input.read(&mut buf[got..]) {
            Ok(0) if got == 0 && what == "header" => return false,
            Ok(0) => fail(1, &format!("a framed record's {} was cut short ({} of {} bytes)", what, got, buf.len())),
            Ok(k) => got += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => fail(1, &format!("reading stdin: {}", e)),
        }
    }
    true
}

fn publish(args: &Args) -> i32 {
    if !args.switch("framed") {
        fail(2, "--mode pub reads framed records from stdin: give --framed");
    }
    let address = cstring(args.need("address"));
    let stream = cstring(args.need("stream"));
    let dtype = args.get("dtype").map(cstring);
    let names = CList::new(args.get("channel-names"));
    let types = CList::new(args.get("channel-types"));
    let units = CList::new(args.get("channel-units"));
    let source_id = args.get("source-id").map(cstring);
    let loan = args.switch("loan");

    let mut o = PubOptions {
        struct_size: 0,
        dtype: ptr::null(),
        channels: 0,
        nslabs: 0,
        rate: 0.0,
        slab_bytes: 0,
        max_chunk_bytes: 0,
        timeout_ms: 0,
        timestamps: 0,
        statistics: 0.0,
        channel_names: ptr::null(),
        channel_types: ptr::null(),
        channel_units: ptr::null(),
        source_id: ptr::null(),
    };
    // The library's defaults for the bytes this program declares (struct_size = 96); `label`, past them, too.
    unsafe { sc_pub_options_init_sized(&mut o, size_of::<PubOptions>()) };
    if let Some(d) = &dtype {
        o.dtype = d.as_ptr();
    }
    o.channels = args.number("channels", o.channels);
    o.nslabs = args.number("nslabs", o.nslabs);
    o.rate = args.number("rate", o.rate);
    o.slab_bytes = args.number("slab-bytes", o.slab_bytes);
    o.timeout_ms = args.number("timeout-ms", o.timeout_ms);
    o.timestamps = args.switch("timestamps") as c_int;
    o.channel_names = list_ptr(&names);
    o.channel_types = list_ptr(&types);
    o.channel_units = list_ptr(&units);
    o.source_id = source_id.as_ref().map_or(ptr::null(), |s| s.as_ptr());

    let mut p: *mut Pub = ptr::null_mut();
    let rc = unsafe { sc_pub_open(address.as_ptr(), stream.as_ptr(), &o, &mut p) };
    if rc != SC_OK {
        let why = text(unsafe { sc_pub_errmsg(ptr::null()) });
        eprintln!("slabcast-rs: {} ({})", why, text(unsafe { sc_strerror(rc) }));
        return 1;
    }
    let info = unsafe { &*sc_pub_get_info(p) };
    if info.struct_size < size_of::<PubInfo>() {
        fail(1, &format!("sc_pub_info has {} bytes, this program reads {}", info.struct_size, size_of::<PubInfo>()));
    }
    let (sample_bytes, max_frame) = (info.sample_bytes, info.max_frame);
    println!("ready dtype={} sample_bytes={} max_frame={}", text(info.dtype), sample_bytes, max_frame);
    let _ = io::stdout().flush();

    let stop = Arc::new(AtomicBool::new(false));
    let service = {
        let (stop, shared) = (Arc::clone(&stop), Shared(p));
        thread::spawn(move || {
            let shared = shared; // the whole struct (Send), not its raw pointer field, moves into the thread
            while !stop.load(Ordering::Acquire) {
                if unsafe { sc_pub_service(shared.0) } != SC_OK {
                    return; // sticky: the next write returns the same error, with its message
                }
                thread::sleep(Duration::from_millis(10));
            }
        })
    };

    let stdin = io::stdin();
    let mut input = stdin.lock();
    let mut header = [0u8; 16];
    let (mut samples, mut stamps) = (Vec::new(), Vec::new());
    let mut times: Vec<f64> = Vec::new();
    let (mut k, mut rc, mut call) = (0u64, SC_OK, "");
    while rc == SC_OK && read_record_part(&mut input, &mut header, "header") {
        let n = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as u64;
        let record_flags = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        let mut t0 = [0u8; 8];
        t0.copy_from_slice(&header[8..16]);
        let t0 = f64::from_le_bytes(t0);
        let (flags, has_times) = (record_flags & 0xFF, record_flags & 0x100 != 0);
        if n == 0 || n > max_frame || record_flags & !0x1FF != 0 {
            fail(1, &format!("a framed record with n={} flags={:#x}: 1..{} samples", n, record_flags, max_frame));
        }
        if has_times {
            stamps.resize(n as usize * 8, 0);
            read_record_part(&mut input, &mut stamps, "times");
            times.clear();
            times
                .extend(stamps.chunks(8).map(|b| f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])));
        }
        samples.resize(n as usize * sample_bytes, 0);
        read_record_part(&mut input, &mut samples, "samples");
        if !loan {
            call = "sc_pub_write";
            let t = if has_times { times.as_ptr() } else { ptr::null() };
            rc = unsafe { sc_pub_write(p, samples.as_ptr() as *const c_void, n, t0, flags, t) };
        } else {
            // In place: room for n samples (and their times) in the stream's shared memory, filled, published.
            let mut room: *mut c_void = ptr::null_mut();
            call = "sc_pub_loan";
            rc = unsafe { sc_pub_loan(p, n, &mut room) };
            if rc == SC_OK && has_times {
                let mut room_times: *mut f64 = ptr::null_mut();
                call = "sc_pub_loan_times";
                rc = unsafe { sc_pub_loan_times(p, &mut room_times) };
                if rc == SC_OK {
                    unsafe { ptr::copy_nonoverlapping(times.as_ptr(), room_times, times.len()) };
                }
            }
            if rc == SC_OK {
                unsafe { ptr::copy_nonoverlapping(samples.as_ptr(), room as *mut u8, samples.len()) };
                call = "sc_pub_commit";
                rc = unsafe { sc_pub_commit(p, n, t0, flags) };
            }
        }
        k += 1;
    }
    let message = if rc == SC_OK { String::new() } else { text(unsafe { sc_pub_errmsg(p) }) };
    stop.store(true, Ordering::Release);
    let _ = service.join();
    let mut stats = PubStats::default();
    unsafe { sc_pub_get_stats_sized(p, &mut stats, size_of::<PubStats>()) };
    if rc != SC_OK {
        eprintln!("slabcast-rs: frame {}: {}: {} ({})", k - 1, call, message, text(unsafe { sc_strerror(rc) }));
        unsafe { sc_pub_close(p) };
        return 1;
    }
    let closed = unsafe { sc_pub_close(p) };
    if closed != SC_OK {
        let why = text(unsafe { sc_pub_errmsg(ptr::null()) });
        eprintln!("slabcast-rs: sc_pub_close: {} ({})", why, text(unsafe { sc_strerror(closed) }));
        return 1;
    }
    println!(
        "done frames={} samples={} notices={} published={} slabs={} wakes={} filled={}",
        stats.frames, stats.samples, stats.notices, stats.published, stats.slabs, stats.wakes, stats.struct_size
    );
    0
}

// ------------------------------------------------------------------------------------------ main

fn main() {
    // The library this process loaded must have the ABI these declarations mirror: check once, first.
    let abi = unsafe { sc_abi_version() };
    if abi != ABI_VERSION {
        fail(1, &format!("libslabcast has ABI {}, this program was written for ABI {}", abi, ABI_VERSION));
    }
    let args = Args::parse();
    let status = match args.need("mode") {
        "version" => {
            let (mut a, mut b, mut c) = (0, 0, 0);
            let v = text(unsafe { sc_library_version(&mut a, &mut b, &mut c) });
            // Which file the dynamic linker mapped (found through the rpath, not LD_LIBRARY_PATH).
            let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
            let mapped = maps.lines().filter_map(|l| l.split_whitespace().nth(5)).find(|f| f.contains("libslabcast"));
            println!("libslabcast {} {} {} {} abi {} mapped={}", v, a, b, c, abi, mapped.unwrap_or("?"));
            0
        }
        "sub" => subscribe(&args),
        "pub" => publish(&args),
        other => fail(2, &format!("--mode must be version, sub or pub, got {:?}", other)),
    };
    exit(status)
}
