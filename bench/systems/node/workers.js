// Preloaded with `node -r ./workers.js cluster.js` only when the harness wants a worker count
// other than the CPU count (the 1-worker scaling run): cluster.js stays verbatim and forks
// os.cpus().length workers, so os.cpus() is cut to BENCH_WORKERS entries.
const os = require('os');
const n = parseInt(process.env.BENCH_WORKERS, 10);
if (n > 0) {
  const cpus = os.cpus;
  os.cpus = () => cpus().slice(0, n);
}
