// An MQTT subscriber run inside a cloudlet's namespaces (the broker listens there, the test process is not there): it
// prints `subscribed` once the broker holds its subscription, then one JSON line per message ({topic, json, retain}).
// It ends when its stdin closes, or after 10 minutes whatever happens.
import mqtt from 'mqtt';

const [url, topic, username, password] = process.argv.slice(2) as [string, string, string, string];
const client = mqtt.connect(url, { username, password, reconnectPeriod: 0 });
client.on('connect', () => {
  client.subscribe(topic, { qos: 1 }, (err) => {
    if (err) fail(err);
    else process.stdout.write('subscribed\n');
  });
});
client.on('message', (at, payload, packet) => {
  process.stdout.write(JSON.stringify({ topic: at, json: payload.length ? JSON.parse(payload.toString()) : null, retain: packet.retain }) + '\n');
});
client.on('error', fail);

function fail(err: Error): void {
  process.stderr.write(`mqtt-tail: ${err.message}\n`);
  process.exit(1);
}

process.stdin.resume();
process.stdin.once('end', () => process.exit(0));
setTimeout(() => process.exit(1), 10 * 60_000).unref();
