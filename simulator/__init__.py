"""A virtual ASIC farm that speaks the miners' real protocols on loopback addresses.

Each virtual miner owns a true state (:mod:`simulator.state`) that changes only through
its protocols or the control API; a *personality* (:mod:`simulator.personalities`)
renders that state the way one firmware family does on the wire.
"""
