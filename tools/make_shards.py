"""Make tokenized webdataset shards: `python tools/make_shards.py [SOURCE ...] [-o DIR] [--tokenizer tokenizer.json]`.

With no SOURCE it builds the demo data (the Python standard library's source files) into
data/stdlib. `--help` lists the options; the code is mdn_scale/data/make_shards.py.
"""

import sys

from mdn_scale.data.make_shards import main

if __name__ == "__main__":
    sys.exit(main())
