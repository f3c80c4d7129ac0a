"""Training datasets of posed DRRs: specs, the sampler, Ray workers, tar shards."""
