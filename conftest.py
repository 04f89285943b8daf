# The suite's pytest plugin lives in the package; it is registered here, and only here.
pytest_plugins = ["blkif_spec.pytest_plugin"]
