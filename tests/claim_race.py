"""One racer process: waits for a start time, claims a run, prints OK or NONE. (Used by test_leases.)"""

import sys
import time

from dynamiq_redis_ckpt import RedisCheckpointBackend
from dynamiq_redis_ckpt.worker import Recovery

if __name__ == "__main__":
    url, prefix, flow, run, start = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], float(sys.argv[5])
    recovery = Recovery(RedisCheckpointBackend(url=url, prefix=prefix))
    time.sleep(max(0.0, start - time.time()))
    claim = recovery.claim(flow, run)
    print("OK" if claim else "NONE", claim.token if claim else "")
