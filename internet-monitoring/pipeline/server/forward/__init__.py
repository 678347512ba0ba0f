"""Forwarding committed results to other systems (today: Prometheus remote write).

``plan`` is the sans-I/O core (what to send, in which order, what an answer means),
``http`` the aiohttp transport, ``forwarder`` the asyncio shell the server app starts.
"""
