"""The one name `pip install -e .` puts on the import path: the console commands (`pic.commands`).

The trainer's own modules (train, config, pipeline, model, eval, benchmarks) stay in the checkout and are not
installed, so they cannot shadow a user's modules of the same generic names; a command puts the checkout on the
path of its own process only.
"""
