#!/usr/bin/env node
// libslabcast from Node.js through koffi (an FFI package: no compiler, no native addon of our own).
//
// The library is found the way a C program finds it: `pkg-config --variable=libdir slabcast` gives the directory
// (set PKG_CONFIG_PATH=<prefix>/lib/pkgconfig for a private prefix), and the file loaded is the SONAME,
// libslabcast.so.<ABI> (not the unversioned libslabcast.so, which only development installs have); SLABCAST_LIB
// names the file directly.  No LD_LIBRARY_PATH.  clients/bindings/README.md explains each choice.
//
//   node slabcast.js --mode version
//   node slabcast.js --mode sub --address ADDR --stream NAME --size N [--clip]
//   node slabcast.js --mode pub --framed --address ADDR --stream NAME [--dtype D] [--channels C] [--rate R]
//                    [--slab-bytes B] [--nslabs K] [--timeout-ms MS] [--timestamps] [--loan]
//                    [--channel-names a,b] [--channel-types t,t] [--channel-units u,u] [--source-id S]
//
// `sub` prints `ready`, one line per chunk (`seq=… index=… n=… t0=%.9f crc=<crc32 of the bytes>`, as
// slabcast-sub) and exits 0 at the end of the stream; each sc_recv runs on koffi's worker thread (`.async`), one
// at a time, so the event loop keeps running while it waits (its timer ticks are printed on stderr at the end).
// `pub` prints `ready`, then reads framed records from stdin as `slabcast-pub --framed` does (little-endian u32 n,
// u32 flags (bit 0: a discontinuity before the frame; bit 8: n f64 times follow), f64 t0, the times, n samples),
// writes each with sc_pub_write, or with `--loan` in place (sc_pub_loan, sc_pub_loan_times, a copy into the
// loaned room, sc_pub_commit); at the end of stdin it closes the stream and prints the publisher's counters
// (`done frames=… samples=… notices=… published=… slabs=… wakes=…`).  A timer calls sc_pub_service every 10 ms.
'use strict';

const { execFileSync } = require('node:child_process');
const path = require('node:path');
const koffi = require('koffi');

// The ABI these declarations mirror: the N of libslabcast.so.N (SC_ABI_VERSION of slabcast.h).
const ABI_VERSION = 1;

const SC_OK = 0;
const SC_EOF = -1;
const SC_ETIMEOUT = -2;

function libraryPath() {
  if (process.env.SLABCAST_LIB) return process.env.SLABCAST_LIB;
  let libdir;
  try {
    libdir = execFileSync('pkg-config', ['--variable=libdir', 'slabcast'], { encoding: 'utf8' }).trim();
  } catch (err) {
    fail(1, `pkg-config found no slabcast (set PKG_CONFIG_PATH=<prefix>/lib/pkgconfig): ${err.message}`);
  }
  return path.join(libdir, `libslabcast.so.${ABI_VERSION}`);
}

function fail(status, message) {
  process.stderr.write(`slabcast-node: ${message}\n`);
  process.exit(status);
}

// ------------------------------------------------------------------------------------------------ the C API

const lib = koffi.load(libraryPath());

koffi.opaque('sc_client');
koffi.opaque('sc_pub');

// The structs as slabcast.h 1.3 lays them out, whole: each begins with struct_size, and the library reads or
// fills only that many bytes, so a binding written for an older header keeps working with a newer library.
koffi.struct('sc_sub_options', {
  struct_size: 'size_t', size: 'uint64_t', seconds: 'double', clip: 'int', policy: 'const char *',
  max_inflight: 'unsigned int', reserved: 'unsigned int', wake: 'const char *', sampler: 'double', wait_ms: 'int',
  reserved2: 'unsigned int',
});
const Chunk = koffi.struct('sc_chunk', {
  struct_size: 'size_t', data: 'const void *', n: 'uint64_t', nbytes: 'size_t', dtype: 'const char *',
  channels: 'unsigned int', t0: 'double', seq: 'uint64_t', index: 'uint64_t', flags: 'unsigned int',
  reserved: 'unsigned int', times: 'const double *',
});
koffi.struct('sc_pub_options', {
  struct_size: 'size_t', dtype: 'const char *', channels: 'unsigned int', nslabs: 'unsigned int', rate: 'double',
  slab_bytes: 'uint64_t', max_chunk_bytes: 'uint64_t', timeout_ms: 'int', timestamps: 'int', statistics: 'double',
  channel_names: 'const char **', channel_types: 'const char **', channel_units: 'const char **',
  source_id: 'const char *', label: 'const char *',
});
// Owned by the library: read through a pointer, never a field past its struct_size.
const PubInfo = koffi.struct('sc_pub_info', {
  struct_size: 'size_t', name: 'const char *', dtype: 'const char *', itemsize: 'unsigned int',
  channels: 'unsigned int', sample_bytes: 'size_t', rate: 'double', slab_bytes: 'uint64_t', reserve: 'uint64_t',
  max_frame: 'uint64_t',
});
const PubStats = koffi.struct('sc_pub_stats', {
  struct_size: 'size_t', frames: 'uint64_t', samples: 'uint64_t', notices: 'uint64_t', published: 'uint64_t',
  slabs: 'uint64_t', wakes: 'uint64_t',
});

const sc = {
  library_version: lib.func('const char *sc_library_version(_Out_ int *major, _Out_ int *minor, _Out_ int *patch)'),
  abi_version: lib.func('int sc_abi_version(void)'),
  strerror: lib.func('const char *sc_strerror(int code)'),
  new: lib.func('sc_client *sc_new(void)'),
  connect: lib.func('int sc_connect(sc_client *c, const char *address)'),
  sub_options_init_sized: lib.func('void sc_sub_options_init_sized(_Out_ sc_sub_options *opts, size_t size)'),
  subscribe: lib.func('int sc_subscribe(sc_client *c, const char *stream, const sc_sub_options *opts)'),
  // The chunk is a Buffer the library writes into (it stays where it is for the async call, and sc_release
  // reads its seq from the same bytes).
  recv_sized: lib.func('int sc_recv_sized(sc_client *c, void *chunk, size_t size, int timeout_ms)'),
  release: lib.func('int sc_release(sc_client *c, const void *chunk)'),
  errmsg: lib.func('const char *sc_errmsg(const sc_client *c)'),
  close: lib.func('void sc_close(sc_client *c)'),
  pub_options_init_sized: lib.func('void sc_pub_options_init_sized(_Out_ sc_pub_options *opts, size_t size)'),
  pub_open: lib.func('int sc_pub_open(const char *address, const char *stream, const sc_pub_options *opts, ' +
                     '_Out_ sc_pub **out)'),
  pub_write: lib.func('int sc_pub_write(sc_pub *p, const void *data, uint64_t n, double t0, unsigned int flags, ' +
                      'const double *times)'),
  pub_loan: lib.func('int sc_pub_loan(sc_pub *p, uint64_t n, _Out_ void **data)'),
  pub_loan_times: lib.func('int sc_pub_loan_times(sc_pub *p, _Out_ double **times)'),
  pub_commit: lib.func('int sc_pub_commit(sc_pub *p, uint64_t n, double t0, unsigned int flags)'),
  pub_service: lib.func('int sc_pub_service(sc_pub *p)'),
  pub_get_info: lib.func('const sc_pub_info *sc_pub_get_info(const sc_pub *p)'),
  pub_get_stats_sized: lib.func('void sc_pub_get_stats_sized(const sc_pub *p, _Out_ sc_pub_stats *out, size_t size)'),
  pub_close: lib.func('int sc_pub_close(sc_pub *p)'),
  pub_errmsg: lib.func('const char *sc_pub_errmsg(const sc_pub *p)'),
};

// ------------------------------------------------------------------------------------------------ arguments

const SWITCHES = ['clip', 'framed', 'loan', 'timestamps'];  // options without a value

function parseArgs(argv) {
  const args = {};
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a.startsWith('--') && SWITCHES.includes(a.slice(2))) args[a.slice(2)] = true;
    else if (a.startsWith('--') && i + 1 < argv.length) args[a.slice(2)] = argv[++i];
    else fail(2, `unexpected argument ${JSON.stringify(a)}`);
  }
  return args;
}

function need(args, key) {
  if (args[key] === undefined) fail(2, `--${key} is required`);
  return args[key];
}

// ------------------------------------------------------------------------------------------------ subscribe

const CRC_TABLE = new Int32Array(256).map((_, n) => {
  let c = n;
  for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
  return c;
});

function crc32(bytes) {
  let c = -1;
  for (let i = 0; i < bytes.length; i++) c = CRC_TABLE[(c ^ bytes[i]) & 0xff] ^ (c >>> 8);
  return (c ^ -1) >>> 0;
}

function recvAsync(c, chunk, timeoutMs) {
  return new Promise((resolve, reject) => {
    sc.recv_sized.async(c, chunk, chunk.length, timeoutMs, (err, rc) => (err ? reject(err) : resolve(rc)));
  });
}

async function subscribe(args) {
  const c = sc.new();
  if (!c) fail(1, 'sc_new: out of memory');
  const opts = {};
  sc.sub_options_init_sized(opts, koffi.sizeof('sc_sub_options'));  // the library's defaults, struct_size set
  opts.size = Number(need(args, 'size'));
  opts.clip = args.clip ? 1 : 0;
  let rc = sc.connect(c, need(args, 'address'));
  if (rc === SC_OK) rc = sc.subscribe(c, need(args, 'stream'), opts);
  if (rc !== SC_OK) {
    process.stderr.write(`slabcast-node: ${sc.errmsg(c)} (${sc.strerror(rc)})\n`);
    sc.close(c);
    return 1;
  }
  process.stdout.write('ready\n');

  let ticks = 0;
  const timer = setInterval(() => ticks++, 5);
  const chunk = Buffer.alloc(koffi.sizeof(Chunk));
  // One call on the client at a time (slabcast.h, "Threads"): each await orders the next call after this one,
  // whichever worker thread ran it.
  while ((rc = await recvAsync(c, chunk, 1000)) === SC_OK || rc === SC_ETIMEOUT) {
    if (rc === SC_ETIMEOUT) continue;
    const ch = koffi.decode(chunk, Chunk);
    if (Number(ch.struct_size) !== chunk.length) {
      rc = null;
      process.stderr.write(`slabcast-node: sc_recv_sized filled ${ch.struct_size} bytes of ${chunk.length}\n`);
      break;
    }
    // A view of the stream's shared memory (no copy): valid, and unchanged, until sc_release.
    const bytes = new Uint8Array(koffi.view(ch.data, Number(ch.nbytes)));
    const crc = crc32(bytes).toString(16).padStart(8, '0');
    process.stdout.write(`seq=${ch.seq} index=${ch.index} n=${ch.n} t0=${ch.t0.toFixed(9)} crc=${crc}\n`);
    if ((rc = sc.release(c, chunk)) !== SC_OK) break;
  }
  clearInterval(timer);
  process.stderr.write(`slabcast-node: event loop ticks while subscribed: ${ticks}\n`);
  let status = 0;
  if (rc !== SC_EOF) {
    if (rc !== null) process.stderr.write(`slabcast-node: ${sc.errmsg(c)} (${sc.strerror(rc)})\n`);
    status = 1;
  }
  sc.close(c);
  return status;
}

// ------------------------------------------------------------------------------------------------ publish

function publish(args) {
  if (!args.framed) fail(2, '--mode pub reads framed records from stdin: give --framed');
  const opts = {};
  sc.pub_options_init_sized(opts, koffi.sizeof('sc_pub_options'));  // the library's defaults, struct_size set
  if (args.dtype !== undefined) opts.dtype = args.dtype;
  for (const [key, field] of [['channels', 'channels'], ['nslabs', 'nslabs'], ['rate', 'rate'],
                              ['slab-bytes', 'slab_bytes'], ['timeout-ms', 'timeout_ms']]) {
    if (args[key] !== undefined) opts[field] = Number(args[key]);
  }
  opts.timestamps = args.timestamps ? 1 : 0;
  for (const key of ['channel_names', 'channel_types', 'channel_units']) {
    const given = args[key.replace('_', '-')];
    if (given !== undefined) opts[key] = given.split(',');  // koffi passes an array of strings as const char **
  }
  if (args['source-id'] !== undefined) opts.source_id = args['source-id'];

  const out = [null];
  const rc = sc.pub_open(need(args, 'address'), need(args, 'stream'), opts, out);
  if (rc !== SC_OK) fail(1, `${sc.pub_errmsg(null)} (${sc.strerror(rc)})`);
  const pub = out[0];
  const info = koffi.decode(sc.pub_get_info(pub), PubInfo);
  if (Number(info.struct_size) < koffi.sizeof(PubInfo)) fail(1, `sc_pub_info has ${info.struct_size} bytes`);
  const sampleBytes = Number(info.sample_bytes);
  const maxFrame = Number(info.max_frame);
  process.stdout.write(`ready dtype=${info.dtype} sample_bytes=${sampleBytes} max_frame=${maxFrame}\n`);

  // Between writes (here: while stdin has nothing) the publisher answers joining subscribers only when called.
  const service = setInterval(() => sc.pub_service(pub), 10);
  let pending = Buffer.alloc(0);
  let frames = 0;

  function check(code, what) {
    if (code === SC_OK) return;
    const message = sc.pub_errmsg(pub);  // per thread: this one, which made the call
    clearInterval(service);
    sc.pub_close(pub);
    fail(1, `frame ${frames}: ${what}: ${message} (${sc.strerror(code)})`);
  }

  function writeFrames() {
    while (pending.length >= 16) {
      const n = pending.readUInt32LE(0);
      const recordFlags = pending.readUInt32LE(4);
      const t0 = pending.readDoubleLE(8);
      const flags = recordFlags & 0xff;
      const timesBytes = recordFlags & 0x100 ? 8 * n : 0;
      if (n === 0 || n > maxFrame || (recordFlags & ~0x1ff) !== 0) {
        fail(1, `a framed record with n=${n} flags=${recordFlags}: 1..${maxFrame} samples`);
      }
      const end = 16 + timesBytes + n * sampleBytes;
      if (pending.length < end) return;
      const times = timesBytes ? pending.subarray(16, 16 + timesBytes) : null;
      const samples = pending.subarray(16 + timesBytes, end);
      if (!args.loan) {
        // A Buffer is passed as a pointer to its bytes (the times too: n little-endian doubles).
        check(sc.pub_write(pub, samples, n, t0, flags, times), 'sc_pub_write');
      } else {
        const room = [null];
        check(sc.pub_loan(pub, n, room), 'sc_pub_loan');
        if (times) {
          const roomTimes = [null];
          check(sc.pub_loan_times(pub, roomTimes), 'sc_pub_loan_times');
          new Uint8Array(koffi.view(roomTimes[0], times.length)).set(times);
        }
        new Uint8Array(koffi.view(room[0], samples.length)).set(samples);  // written in place, in shared memory
        check(sc.pub_commit(pub, n, t0, flags), 'sc_pub_commit');
      }
      frames++;
      pending = pending.subarray(end);
    }
  }

  process.stdin.on('data', (data) => {
    pending = pending.length ? Buffer.concat([pending, data]) : data;
    writeFrames();
  });
  process.stdin.on('end', () => {
    clearInterval(service);
    if (pending.length) fail(1, `a framed record was cut short (${pending.length} bytes left)`);
    const s = {};
    sc.pub_get_stats_sized(pub, s, koffi.sizeof(PubStats));
    const closed = sc.pub_close(pub);
    if (closed !== SC_OK) fail(1, `sc_pub_close: ${sc.pub_errmsg(null)} (${sc.strerror(closed)})`);
    process.stdout.write(`done frames=${s.frames} samples=${s.samples} notices=${s.notices} ` +
                         `published=${s.published} slabs=${s.slabs} wakes=${s.wakes} filled=${s.struct_size}\n`);
  });
}

// ------------------------------------------------------------------------------------------------ main

async function main() {
  // The library loaded must have the ABI these declarations mirror: check once, first.
  const abi = sc.abi_version();
  if (abi !== ABI_VERSION) fail(1, `libslabcast has ABI ${abi}, this program was written for ABI ${ABI_VERSION}`);
  const args = parseArgs(process.argv.slice(2));
  switch (need(args, 'mode')) {
    case 'version': {
      const [a, b, c] = [[0], [0], [0]];
      const text = sc.library_version(a, b, c);
      // Which file was mapped: the SONAME file of the prefix pkg-config named (its real name, past the links).
      const maps = require('node:fs').readFileSync('/proc/self/maps', 'utf8').split('\n');
      const mapped = maps.map((l) => l.split(/\s+/)[5]).find((f) => f && f.includes('libslabcast')) || '?';
      process.stdout.write(`libslabcast ${text} ${a[0]} ${b[0]} ${c[0]} abi ${abi} mapped=${mapped}\n`);
      return 0;
    }
    case 'sub':
      return subscribe(args);
    case 'pub':
      publish(args);
      return undefined;  // the stdin handlers finish it
    default:
      return fail(2, `--mode must be version, sub or pub, got ${JSON.stringify(args.mode)}`);
  }
}

main().then(
  (status) => { if (status !== undefined) process.exitCode = status; },
  (err) => fail(1, err.stack || String(err)),
);
