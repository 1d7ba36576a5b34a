"""The federated merger: the shards' answers to one fan-out in, one database's answer out.

Pure: rows in, rows out, no I/O and no asyncio (the frontend's ``gather`` feeds it).
"""
