"""A model that hangs: reports 20 % and then never progresses (HeyGem's known hang)."""

import sys
import time

print("progress: 20%", flush=True)
sys.stderr.write("queue full\n")
sys.stderr.flush()
time.sleep(3600)
