// The worker branch of the seed's cluster.js, alone: what `pm2 start server.js -i max` runs.
const http = require('http');

http.createServer((req, res) => {
  res.writeHead(200);
  res.end('hello world\n');
}).listen(3000);
