#!/usr/bin/env node
// Usage: node demo.js [--k N] [--batch-size N] ADDRESS USER_ID ITEM_ID...
// Sends a purchase event per item over the StreamEvents stream, then prints the user's
// recommendations as JSON: {user_id, sent, ack: {...}, recommendation: {...}}.
// STREAMREC_TOKEN, when set, is sent as a bearer token.
import { connect, makeEvent } from './client.js';

function parseArgs(argv) {
  const options = { k: 10, batchSize: 100 };
  const positional = [];
  for (let i = 0; i < argv.length; i += 1) {
    const arg = argv[i];
    if (arg === '--k' || arg === '-k') options.k = Number(argv[++i]);
    else if (arg === '--batch-size') options.batchSize = Number(argv[++i]);
    else positional.push(arg);
  }
  return { options, positional };
}

async function main() {
  const { options, positional } = parseArgs(process.argv.slice(2));
  const [address, userId, ...items] = positional;
  if (!address || !userId || items.length === 0 || !(options.k > 0) || !(options.batchSize > 0)) {
    console.error('usage: node demo.js [--k N] [--batch-size N] ADDRESS USER_ID ITEM_ID...');
    return 2;
  }
  const client = connect(address, { token: process.env.STREAMREC_TOKEN, deadlineMs: 20_000 });
  try {
    await client.ready(20_000);
    const ack = await client.sendEvents(items.map((item) => makeEvent(userId, item, 'purchase')),
      { batchSize: options.batchSize });
    const recommendation = await client.recommend(userId, options.k);
    process.stdout.write(`${JSON.stringify({ user_id: userId, sent: items, ack, recommendation }, null, 2)}\n`);
    return 0;
  } finally {
    client.close();
  }
}

main().then((code) => { process.exitCode = code; }, (error) => {
  console.error(`demo failed: ${error.code !== undefined ? `gRPC status ${error.code}: ` : ''}${error.details ?? error.message}`);
  process.exitCode = 1;
});
