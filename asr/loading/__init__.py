"""From a path or hub id to a ready model: `checkpoint` (find, read, validate), `torch_zip` (model.pt without torch),
`convert` (the official layout into ours, once), `load` (the network, its runners, the pipeline)."""
