"""Ray: `unskill stats`, `calibrate` and `eval` over an actor pool (Ray Data), `unskill serve` as replicas
(Ray Serve). Needs the `ray` extra; nothing else in unskill imports this package, and it imports ray lazily, so
`import unskill` works without ray.

Model and stats files reach the workers by path: every node must see the same files at the same path (shared
storage: NFS, a mounted bucket, or one machine). Each worker reads the model's manifest there and refuses to run
when its fingerprint differs from the driver's.
"""
