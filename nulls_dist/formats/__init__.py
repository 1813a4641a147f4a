"""Every on-disk format of nulls_dist, one module each, shared by its writer and its readers: the dataset schema
(`dataset`), the shard codec (`shards`), the training/deployed checkpoint layout and its `latest` pointer
(`checkpoint`), weights files (`weights`), atomic writes (`atomic`) and digests (`digests`).

The bottom layer: every package may import it, and it imports no other part of nulls_dist. Only `weights`
needs torch; every other module is standard library + numpy, so the torch-free data pipeline can use them."""
