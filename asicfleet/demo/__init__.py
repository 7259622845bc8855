"""``asicfleet demo``: a controller, a simulated farm and an enrolled agent, in one command."""
