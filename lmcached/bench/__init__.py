"""`lmcached bench`: throughput, lookup, tier and workload benchmarks beside same-run baselines."""
