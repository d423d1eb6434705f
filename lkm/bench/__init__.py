"""`lkm bench`: a load generator and micro-benchmarks in the spirit of `redis-benchmark` and `openssl speed`.

    http.py      just enough HTTP/1.1 over TLS to drive lkm while spending little CPU in the client
    requests.py  pre-wrapped ciphertext pools and the requests of each route (platform, native, batch)
    load.py      the load run: keep-alive or fresh connections, closed loop or a fixed rate; latency, errors
    raw.py       the same key store's private-key operation in-process, on N threads: the ceiling
    spawn.py     starts `lkm serve` as a child process with a derived config (ports, worker threads)
    startup.py   start-up time and memory with thousands of keys; latency against the number of keys
    report.py    results as JSON and as a table
    suite.py     every figure of the README's Performance table in one run
    options.py   the command line's options (`lkm bench --help`); command.py runs them
"""
