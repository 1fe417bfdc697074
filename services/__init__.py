"""livepipe's processes: one module per process, each started by `livepipe VERB`."""
