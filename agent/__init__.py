"""The asicfleet agent: finds, identifies and polls the miners on its LAN segments and
reports to the controller."""
