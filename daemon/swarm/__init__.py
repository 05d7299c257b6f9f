"""The swarm core: mission geometry, bid costs, the contract-net auction (a pure
state machine), and the services that wire it to the bus (robot agent, auctioneer,
watcher).  docs/swarm.md tells the story; docs/protocol.md, Swarm, the wire."""
