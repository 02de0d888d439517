// Local hyperdht testnet: N non-ephemeral nodes on 127.0.0.1, first one on a fixed port.
// usage: node testnet.js [size=5] [port=30001]
const createTestnet = require('hyperdht/testnet')
const size = Number(process.argv[2] || 5)
const port = Number(process.argv[3] || 30001)
createTestnet(size, { host: '127.0.0.1', port }).then(tn => {
  console.log('testnet up:', tn.nodes.length, 'nodes; bootstrap =', JSON.stringify(tn.bootstrap))
  for (const n of tn.nodes) console.log(' node', n.address())
  process.once('SIGTERM', () => tn.destroy().then(() => process.exit()))
  process.once('SIGINT', () => tn.destroy().then(() => process.exit()))
})
