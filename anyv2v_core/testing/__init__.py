"""Tools for tests and benchmarks, not for the runtime: a stand-in accelerator (`device_standin`)
and tiny random-weight models written as folders (`tiny_models`). Runtime code never imports
from here."""
