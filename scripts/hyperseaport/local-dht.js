// Preload with: node -r ./local-dht.js ... (see run.sh)
// 1) Replaces hyperdht's built-in public bootstrap list (lib/constants.js BOOTSTRAP_NODES)
//    in place, so every `new HyperDHT()` / `new Hyperswarm()` that hyperseaport creates
//    without a `bootstrap` option uses the local node(s) instead (HSP_BOOTSTRAP=host:port,...).
// 2) Makes every HyperDHT bind its UDP sockets to 127.0.0.1 (HSP_HOST) instead of 0.0.0.0.
//    Needed here because the LAN shortcut in hyperdht/lib/connect.js drops "reserved"
//    interface addresses (this box's eth0 is 192.0.2.2 = TEST-NET-1), and the
//    holepunch fallback then times out (ETIMEDOUT) between two processes.
const path = require('path')
const list = (process.env.HSP_BOOTSTRAP || '127.0.0.1:30001').split(',').filter(Boolean)
const bindHost = process.env.HSP_HOST || '127.0.0.1'
const base = path.dirname(require.resolve('hyperseaport/package.json', { paths: [__dirname] }))
const dhtPath = require.resolve('hyperdht', { paths: [base] })
const constants = require(require.resolve('hyperdht/lib/constants', { paths: [base] }))
constants.BOOTSTRAP_NODES.splice(0, constants.BOOTSTRAP_NODES.length, ...list)

const HyperDHT = require(dhtPath)
class LocalHyperDHT extends HyperDHT {
  constructor (opts = {}) {
    // note: hyperseaport passes a keyPair object as opts in `web`/`proxy`; harmless
    super({ host: bindHost, ...opts })
  }
}
require.cache[dhtPath].exports = LocalHyperDHT
if (process.env.HSP_DEBUG) console.error('[local-dht] bootstrap =', constants.BOOTSTRAP_NODES, 'bind =', bindHost)
