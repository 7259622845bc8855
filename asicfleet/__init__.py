"""asicfleet: fleet agent and controller for licensed ASIC mining farms."""

__version__ = "0.1.0"
