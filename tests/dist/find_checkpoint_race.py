"""Two ranks call `find_checkpoint` on a checkpoint a crash left as `checkpoint.old/`; rank 1 looks
only after rank 0 has put it back. Every rank must take the same barrier, or rank 0 waits forever
(here: a 20 s process-group timeout, then an error)."""

import datetime
import json
import os
import sys
import time

import torch.distributed as dist

from common.checkpoint import find_checkpoint

ckpt = sys.argv[1]
dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=20))
rank = dist.get_rank()
if rank == 1:
    time.sleep(3)  # rank 0 renames checkpoint.old back meanwhile
found = find_checkpoint(ckpt)
dist.barrier()  # both ranks finish together: nobody is left in a barrier of its own
json.dump({"found": found}, open(os.path.join(os.path.dirname(ckpt), f"rank{rank}.json"), "w"))
dist.destroy_process_group()
