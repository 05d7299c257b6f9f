// An aedes 2 (MQTT 5, beta) broker for the broker matrix (tests/brokers.py starts it).
//
//   AEDES_MODULE=/path/to/node_modules/aedes/aedes.js MTOR_PORT=1883 \
//   MTOR_USERS='{"user": "password"}' node aedes_server.mjs
//
// Listens on 127.0.0.1:$MTOR_PORT with aedes's defaults (in-memory persistence),
// accepts only the users in $MTOR_USERS (none given: anonymous) and prints
// "ready <port>" once it accepts connections.  aedes is loaded from $AEDES_MODULE
// because it is installed outside the repository (.ci/brokers.sh).
import net from 'node:net'
import { pathToFileURL } from 'node:url'

const { Aedes } = await import(pathToFileURL(process.env.AEDES_MODULE).href)
const port = Number(process.env.MTOR_PORT)
const users = JSON.parse(process.env.MTOR_USERS || 'null')

const broker = await Aedes.createBroker()
if (users !== null) {
  broker.authenticate = (client, username, password, callback) => {
    if (username in users && password !== undefined && password.toString() === users[username]) {
      callback(null, true)
      return
    }
    const error = new Error('bad user name or password')
    error.returnCode = 4 // MQTT 5: 0x86 bad user name or password
    callback(error, false)
  }
}
broker.on('clientError', (client, err) => {
  console.log('client error', client?.id, err.message)
})

const server = net.createServer(broker.handle)
server.listen(port, '127.0.0.1', () => {
  console.log(`ready ${port}`)
})

function shutdown () {
  server.close()
  broker.close(() => process.exit(0))
}
process.on('SIGTERM', shutdown)
process.on('SIGINT', shutdown)
