"""Starting embedq's processes: the `embedq` command line, the local stack of `embedq up`, child
processes, the Milvus Lite server, Flower. The API and workers are named by import string, so
nothing here imports them."""
