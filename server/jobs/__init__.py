"""Jobs that outlive their call: the job manager (manager.py) owns admission, running, events,
checkpoints and retention; a store (store.py's JobStore, directory_store.py by default) keeps what must
survive the process. Nothing here knows of gRPC: the servicer converts its messages."""
